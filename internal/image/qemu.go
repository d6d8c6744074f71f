package image

import (
	"context"
	"errors"
)

// buildQEMU builds a kernel + initramfs image. (Issue 4: being written.)
func buildQEMU(ctx context.Context, o Options, m Manifest) (string, error) {
	return "", errors.New("qemu images: not built yet")
}
