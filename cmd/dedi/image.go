package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"

	"dedi.dev/dedi/internal/image"
)

const imageUsage = `usage: dedi image build --format qemu|docker --name NAME [flags] BUILD_DIR -- COMMAND [ARGS...]

Builds a VM image of a game server build: BUILD_DIR holds the executable and
its files, COMMAND is relative to it. The last line printed is the image
reference to put in a fleet's "image".
`

// runImage is "dedi image build".
func runImage(args []string, stdout, stderr io.Writer) error {
	if len(args) == 0 || args[0] != "build" {
		fmt.Fprint(stderr, imageUsage)
		return errUsage
	}
	args = args[1:]
	fs := flag.NewFlagSet("dedi image build", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() { fmt.Fprint(stderr, imageUsage); fs.PrintDefaults() }
	var o image.Options
	var ports listFlag
	logLevel := fs.String("log-level", "info", "debug, info, warn or error")
	fs.StringVar(&o.Format, "format", "", "qemu or docker")
	fs.StringVar(&o.Name, "name", "", "the image's name")
	fs.StringVar(&o.OutDir, "out", filepath.Join(defaultDataDir(), "images"), "where qemu images are kept")
	fs.StringVar(&o.DediBinary, "dedi", "", "the static dedi binary to put in the image (default: this one)")
	fs.StringVar(&o.Kernel, "kernel", "", "qemu: the kernel to boot (default: the newest /boot/vmlinuz-*-cloud-amd64)")
	fs.Var(&ports, "port", "a named port the game uses (repeatable; default game)")
	// The flags come first, then BUILD_DIR, then "--" and the command.
	var cmd []string
	if i := slices.Index(args, "--"); i >= 0 {
		args, cmd = args[:i], args[i+1:]
	}
	if err := fs.Parse(args); err != nil {
		return errUsage
	}
	if fs.NArg() != 1 || len(cmd) == 0 {
		fmt.Fprint(stderr, imageUsage)
		return errUsage
	}
	log, err := newLogger(stderr, *logLevel)
	if err != nil {
		return err
	}
	o.BuildDir, o.Command, o.Log, o.DediVersion = fs.Arg(0), cmd, log, version
	if len(ports) > 0 {
		o.Ports = ports
	}
	if o.DediBinary == "" {
		if o.DediBinary, err = os.Executable(); err != nil {
			return fmt.Errorf("find this dedi binary: %w", err)
		}
	}
	if o.Format == "" || o.Name == "" {
		return errors.New("image build needs --format and --name")
	}
	ctx, cancel := signalContext()
	defer cancel()
	ref, err := image.Build(ctx, o)
	if err != nil {
		return err
	}
	fmt.Fprintln(stdout, ref)
	return nil
}
