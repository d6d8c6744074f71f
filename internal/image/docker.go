package image

import (
	"context"
	"errors"
)

// buildDocker builds a FROM scratch image. (Issue 4: being written.)
func buildDocker(ctx context.Context, o Options, m Manifest) (string, error) {
	return "", errors.New("docker images: not built yet")
}
