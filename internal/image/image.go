// Package image builds VM images (VMIs): a game server build (a directory
// with its executable and files) plus a static dedi, in a format a
// provider boots. Every image carries a Manifest that pins its
// executables by SHA-256 and names its default command.
package image

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"path"
	"path/filepath"
	"slices"
	"strings"
	"time"
)

// GameDir is where an image holds the game build: COMMAND (relative to
// BUILD_DIR) runs as GameDir/COMMAND.
const GameDir = "/opt/game"

// ManifestFile is the manifest's name inside an image.
const ManifestFile = "manifest.json"

// Formats are the image formats Build knows.
var Formats = []string{"docker", "qemu"}

// Manifest describes an image: what it runs and what it may run.
type Manifest struct {
	Name        string       `json:"name"`
	Format      string       `json:"format"`
	Command     []string     `json:"command"` // the default command, absolute inside the image (under GameDir)
	Executables []Executable `json:"executables"`
	Ports       []string     `json:"ports"`
	DediVersion string       `json:"dediVersion"`
	CreatedAt   time.Time    `json:"createdAt"`
}

// Executable is one executable file of the game build, pinned by hash.
type Executable struct {
	Path   string `json:"path"` // absolute inside the image
	SHA256 string `json:"sha256"`
}

// Allow returns the LSPM --allow values that pin every executable.
func (m Manifest) Allow() []string {
	out := make([]string, 0, len(m.Executables))
	for _, e := range m.Executables {
		out = append(out, e.Path+"="+e.SHA256)
	}
	return out
}

// Options is one "dedi image build".
type Options struct {
	Format      string   // docker or qemu
	Name        string   // the image's name: [a-z0-9][a-z0-9_.-]*
	BuildDir    string   // the game build
	Command     []string // COMMAND ARGS..., COMMAND relative to BuildDir
	Ports       []string // named ports the game uses; nil: ["game"]
	OutDir      string   // where file-based formats (qemu) keep images
	DediBinary  string   // a static dedi to put in the image
	Kernel      string   // qemu: the kernel (vmlinuz-VERSION, modules in /lib/modules/VERSION); "": the newest KernelGlob
	DediVersion string
	Log         *slog.Logger
}

// Build builds an image and returns its reference, the value a fleet puts
// in "image".
func Build(ctx context.Context, o Options) (string, error) {
	if dir, err := filepath.EvalSymlinks(o.BuildDir); err == nil {
		o.BuildDir = dir // a build dir given through a symlink is walked as the dir itself
	}
	m, err := scan(o)
	if err != nil {
		return "", err
	}
	if o.Log == nil {
		o.Log = slog.New(slog.DiscardHandler)
	}
	switch o.Format {
	case "docker":
		return buildDocker(ctx, o, m)
	case "qemu":
		return buildQEMU(ctx, o, m)
	}
	return "", fmt.Errorf("image format %q: want one of %s", o.Format, strings.Join(Formats, ", "))
}

// scan checks the options and reads the build into a manifest.
func scan(o Options) (Manifest, error) {
	if !slices.Contains(Formats, o.Format) {
		return Manifest{}, fmt.Errorf("image format %q: want one of %s", o.Format, strings.Join(Formats, ", "))
	}
	if !validName(o.Name) {
		return Manifest{}, fmt.Errorf("image name %q: want lowercase letters, digits, '.', '_' or '-', starting with a letter or digit, at most 64", o.Name)
	}
	if len(o.Command) == 0 {
		return Manifest{}, errors.New("no command: give the game server's executable, relative to the build dir, after --")
	}
	if filepath.IsAbs(o.Command[0]) || !filepath.IsLocal(o.Command[0]) {
		return Manifest{}, fmt.Errorf("command %q must be a path inside the build dir, relative to it", o.Command[0])
	}
	st, err := os.Stat(o.BuildDir)
	if err != nil {
		return Manifest{}, fmt.Errorf("build dir: %w", err)
	}
	if !st.IsDir() {
		return Manifest{}, fmt.Errorf("build dir %s is not a directory", o.BuildDir)
	}
	main := filepath.Join(o.BuildDir, o.Command[0])
	// Symlinks are followed only inside the build: the image holds nothing
	// else, so one that leads out of it would dangle (or name dedi's files).
	root, err := os.OpenRoot(o.BuildDir)
	if err != nil {
		return Manifest{}, fmt.Errorf("build dir: %w", err)
	}
	defer root.Close()
	mst, err := root.Stat(o.Command[0])
	if err != nil {
		return Manifest{}, fmt.Errorf("command %s: %w (symlinks must stay inside the build dir)", main, err)
	}
	if !mst.Mode().IsRegular() || mst.Mode()&0o111 == 0 {
		return Manifest{}, fmt.Errorf("command %s is not an executable file", main)
	}
	m := Manifest{
		Name:        o.Name,
		Format:      o.Format,
		Command:     append([]string{path.Join(GameDir, filepath.ToSlash(o.Command[0]))}, o.Command[1:]...),
		Ports:       o.Ports,
		DediVersion: o.DediVersion,
		CreatedAt:   time.Now().UTC().Truncate(time.Second),
	}
	if m.Ports == nil {
		m.Ports = []string{"game"}
	}
	err = filepath.WalkDir(o.BuildDir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.Type()&fs.ModeSymlink != 0 {
			rel, _ := filepath.Rel(o.BuildDir, p)
			if _, err := root.Stat(rel); err != nil {
				target, _ := os.Readlink(p)
				return fmt.Errorf("symlink %s -> %s does not lead to a file of the build dir (%v): copy what it names into the build", p, target, err)
			}
			return nil
		}
		if !d.Type().IsRegular() {
			return nil
		}
		info, err := d.Info()
		if err != nil {
			return err
		}
		if info.Mode()&0o111 == 0 {
			return nil
		}
		rel, err := filepath.Rel(o.BuildDir, p)
		if err != nil {
			return err
		}
		sum, err := fileSHA256(p)
		if err != nil {
			return err
		}
		m.Executables = append(m.Executables, Executable{Path: path.Join(GameDir, filepath.ToSlash(rel)), SHA256: sum})
		return nil
	})
	if err != nil {
		return Manifest{}, fmt.Errorf("read build dir: %w", err)
	}
	return m, nil
}

func validName(s string) bool {
	if s == "" || len(s) > 64 {
		return false
	}
	for i, c := range s {
		switch {
		case c >= 'a' && c <= 'z', c >= '0' && c <= '9':
		case i > 0 && (c == '.' || c == '_' || c == '-'):
		default:
			return false
		}
	}
	return true
}

// fileSHA256 returns the hex SHA-256 of the file at p.
func fileSHA256(p string) (string, error) {
	f, err := os.Open(p)
	if err != nil {
		return "", err
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return "", err
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}

// marshalManifest is the manifest as stored in an image.
func marshalManifest(m Manifest) ([]byte, error) {
	return json.MarshalIndent(m, "", "  ")
}
