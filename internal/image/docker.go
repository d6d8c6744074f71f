package image

import (
	"archive/tar"
	"context"
	"crypto/sha256"
	"debug/elf"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"regexp"
	"strings"

	"github.com/moby/moby/api/types/build"
	"github.com/moby/moby/api/types/jsonstream"
	"github.com/moby/moby/client"
)

// The layout of a docker image. It is built FROM scratch: nothing but
// these files.
//
//	/dedi/dedi            the static dedi (ENTRYPOINT); the provider runs "dedi lspm ..."
//	/dedi/manifest.json   the Manifest
//	/dedi/data/           the LSPM's data dir, owned by DockerUser
//	/opt/game/...         the game build (GameDir), owned by root, read-only to the game
const (
	DockerDedi     = "/dedi/dedi"
	DockerManifest = "/dedi/manifest.json"
	DockerDataDir  = "/dedi/data"
	// DockerUser is the unprivileged uid:gid the image runs as (the LSPM
	// and its game servers). The image has no /etc/passwd: it is numeric.
	DockerUser = "10001:10001"
)

// Labels of a docker image built by dedi. LabelManifest holds the
// manifest as JSON, which the docker provider reads to learn the default
// command and the executables it pins.
const (
	LabelImage    = "dev.dedi.image"
	LabelManifest = "dev.dedi.manifest"
	LabelVersion  = "dev.dedi.version"
)

// DockerRepo is the repository of image NAME's docker images: the
// reference Build prints is DockerRepo(NAME):<the first 12 hex digits of
// the image ID>.
func DockerRepo(name string) string { return "dedi-" + name }

// dockerRepoPattern is a docker repository path component.
var dockerRepoPattern = regexp.MustCompile(`^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*$`)

// NewDockerClient returns a client of the Docker engine named by the
// environment (DOCKER_HOST, default the local socket), which negotiates
// the API version with the engine.
func NewDockerClient() (*client.Client, error) {
	c, err := client.New(client.FromEnv)
	if err != nil {
		return nil, fmt.Errorf("docker client: %w", err)
	}
	return c, nil
}

// buildDocker builds a FROM scratch image through the engine's API from a
// tar build context streamed to it, tags it DockerRepo(NAME):latest and
// DockerRepo(NAME):<short ID>, and returns the latter.
func buildDocker(ctx context.Context, o Options, m Manifest) (string, error) {
	repo := DockerRepo(o.Name)
	if !dockerRepoPattern.MatchString(repo) {
		return "", fmt.Errorf("image name %q cannot name a docker image: separators ('.', '_', '-') must stand between letters or digits", o.Name)
	}
	if o.DediBinary == "" {
		return "", errors.New("no dedi binary to put in the image")
	}
	if interp, isELF, err := elfInterpreter(o.DediBinary); err != nil {
		return "", fmt.Errorf("dedi binary: %w", err)
	} else if !isELF {
		return "", fmt.Errorf("dedi binary %s is not an ELF executable", o.DediBinary)
	} else if interp != "" {
		return "", fmt.Errorf("dedi binary %s is dynamically linked (it needs %s): a docker image is built FROM scratch and has no C library; build dedi with CGO_ENABLED=0 and give it with --dedi", o.DediBinary, interp)
	}
	if err := checkGameStatic(o, m); err != nil {
		return "", err
	}
	manifestJSON, err := marshalManifest(m)
	if err != nil {
		return "", err
	}
	label, err := json.Marshal(m)
	if err != nil {
		return "", err
	}
	if _, err := ParseManifest(label); err != nil { // what the provider will read back
		return "", fmt.Errorf("the build cannot make a docker image: %w", err)
	}

	cli, err := NewDockerClient()
	if err != nil {
		return "", err
	}
	defer cli.Close()
	if _, err := cli.Ping(ctx, client.PingOptions{NegotiateAPIVersion: true}); err != nil {
		return "", fmt.Errorf("docker engine at %s: %w", cli.DaemonHost(), err)
	}

	// The context is written while the engine reads it; the writer is
	// waited for before returning.
	pr, pw := io.Pipe()
	written := make(chan error, 1)
	go func() {
		err := writeDockerContext(pw, o, m, manifestJSON)
		pw.CloseWithError(err)
		written <- err
	}()
	id, err := runDockerBuild(ctx, cli, pr, repo, o, m, string(label))
	pr.CloseWithError(errors.New("build ended")) // unblocks the writer if the engine stopped reading
	if werr := <-written; err == nil && werr != nil {
		err = fmt.Errorf("build context: %w", werr)
	}
	if err != nil {
		return "", fmt.Errorf("docker build %s: %w", repo, err)
	}
	short := strings.TrimPrefix(id, "sha256:")
	if len(short) < 12 {
		return "", fmt.Errorf("docker build %s: odd image id %q", repo, id)
	}
	ref := repo + ":" + short[:12]
	if _, err := cli.ImageTag(ctx, client.ImageTagOptions{Source: id, Target: ref}); err != nil {
		return "", fmt.Errorf("tag %s: %w", ref, err)
	}
	var size int64
	if insp, err := cli.ImageInspect(ctx, id); err == nil {
		size = insp.Size
	}
	o.Log.Info("docker image built", "ref", ref, "id", id, "bytes", size, "executables", len(m.Executables))
	return ref, nil
}

// runDockerBuild sends the build and reads its progress to the end; it
// returns the new image's ID.
func runDockerBuild(ctx context.Context, cli *client.Client, buildCtx io.Reader, repo string, o Options, m Manifest, manifestLabel string) (string, error) {
	res, err := cli.ImageBuild(ctx, buildCtx, client.ImageBuildOptions{
		Tags:        []string{repo + ":latest"},
		Dockerfile:  "Dockerfile",
		Remove:      true,
		ForceRemove: true,
		Version:     build.BuilderV1, // FROM scratch and COPY need nothing more, and every engine has it
		Labels: map[string]string{
			LabelImage:    o.Name,
			LabelManifest: manifestLabel,
			LabelVersion:  m.DediVersion,
		},
	})
	if err != nil {
		return "", err
	}
	defer res.Body.Close()
	dec := json.NewDecoder(res.Body)
	var id string
	var last []string // the build's last lines, for an error
	for {
		var msg jsonstream.Message
		if err := dec.Decode(&msg); errors.Is(err, io.EOF) {
			break
		} else if err != nil {
			return "", fmt.Errorf("read build progress: %w", err)
		}
		if msg.Error != nil {
			return "", fmt.Errorf("%s (build output: %s)", msg.Error.Message, strings.Join(last, " | "))
		}
		if s := strings.TrimSpace(msg.Stream); s != "" {
			o.Log.Debug("docker build", "out", s)
			last = append(last, s)
			if len(last) > 5 {
				last = last[1:]
			}
		}
		if msg.Aux != nil {
			var aux struct {
				ID string `json:"ID"`
			}
			if json.Unmarshal(*msg.Aux, &aux) == nil && aux.ID != "" {
				id = aux.ID
			}
		}
	}
	if id == "" {
		return "", fmt.Errorf("the engine did not say which image it built (build output: %s)", strings.Join(last, " | "))
	}
	return id, nil
}

// dockerfile copies the context into place. The game build stays owned by
// root, so the game (which runs as DockerUser) cannot change the
// executables the manifest pins.
var dockerfile = `FROM scratch
COPY dedi ` + DockerDedi + `
COPY manifest.json ` + DockerManifest + `
COPY --chown=` + DockerUser + ` data/ ` + DockerDataDir + `/
COPY game/ ` + GameDir + `/
USER ` + DockerUser + `
ENTRYPOINT ["` + DockerDedi + `"]
`

// writeDockerContext writes the build context as a tar stream: the
// Dockerfile, dedi, the manifest, an empty data dir and the game build
// under game/. Modes are normalized (0755 for dirs and executables, 0644
// otherwise) so the game user can read its build whatever the modes on
// disk; the executables are hashed again as they are written, so a build
// that changed since it was scanned fails instead of shipping hashes that
// do not match.
func writeDockerContext(w io.Writer, o Options, m Manifest, manifestJSON []byte) error {
	tw := tar.NewWriter(w)
	addBytes := func(name string, mode int64, b []byte) error {
		if err := tw.WriteHeader(&tar.Header{Name: name, Mode: mode, Size: int64(len(b)), ModTime: m.CreatedAt, Typeflag: tar.TypeReg}); err != nil {
			return err
		}
		_, err := tw.Write(b)
		return err
	}
	if err := addBytes("Dockerfile", 0o644, []byte(dockerfile)); err != nil {
		return err
	}
	if err := addBytes("manifest.json", 0o644, manifestJSON); err != nil {
		return err
	}
	if _, err := addFile(tw, "dedi", o.DediBinary, 0o755); err != nil {
		return fmt.Errorf("dedi binary: %w", err)
	}
	if err := tw.WriteHeader(&tar.Header{Name: "data/", Mode: 0o700, ModTime: m.CreatedAt, Typeflag: tar.TypeDir}); err != nil {
		return err
	}
	pinned := map[string]string{}
	for _, e := range m.Executables {
		pinned[e.Path] = e.SHA256
	}
	root := filepath.Clean(o.BuildDir)
	err := filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, err := filepath.Rel(root, p)
		if err != nil {
			return err
		}
		name := path.Join("game", filepath.ToSlash(rel))
		info, err := d.Info()
		if err != nil {
			return err
		}
		switch {
		case d.IsDir():
			return tw.WriteHeader(&tar.Header{Name: name + "/", Mode: 0o755, ModTime: info.ModTime(), Typeflag: tar.TypeDir})
		case d.Type()&fs.ModeSymlink != 0:
			target, err := os.Readlink(p)
			if err != nil {
				return err
			}
			return tw.WriteHeader(&tar.Header{Name: name, Linkname: target, Mode: 0o777, ModTime: info.ModTime(), Typeflag: tar.TypeSymlink})
		case d.Type().IsRegular():
			mode := int64(0o644)
			if info.Mode()&0o111 != 0 {
				mode = 0o755
			}
			sum, err := addFile(tw, name, p, mode)
			if err != nil {
				return err
			}
			inImage := path.Join(GameDir, filepath.ToSlash(rel))
			if want, ok := pinned[inImage]; mode == 0o755 && (!ok || want != sum) {
				return fmt.Errorf("%s changed while the image was built", p)
			}
			return nil
		default:
			o.Log.Warn("skipping a file that is neither regular, a directory nor a symlink", "path", p, "type", d.Type().String())
			return nil
		}
	})
	if err != nil {
		return err
	}
	return tw.Close()
}

// addFile copies the file at src into the tar as name and returns its
// SHA-256.
func addFile(tw *tar.Writer, name, src string, mode int64) (string, error) {
	f, err := os.Open(src)
	if err != nil {
		return "", err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return "", err
	}
	if err := tw.WriteHeader(&tar.Header{Name: name, Mode: mode, Size: st.Size(), ModTime: st.ModTime(), Typeflag: tar.TypeReg}); err != nil {
		return "", err
	}
	h := sha256.New()
	n, err := io.Copy(io.MultiWriter(tw, h), f)
	if err != nil {
		return "", err
	}
	if n != st.Size() {
		return "", fmt.Errorf("%s changed size while the image was built", src)
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}

// checkGameStatic refuses a game command that cannot run in an image
// without a C library or a shell, and warns about other executables of
// the build that could not.
func checkGameStatic(o Options, m Manifest) error {
	cmd := filepath.Join(o.BuildDir, o.Command[0])
	if real, err := filepath.EvalSymlinks(cmd); err == nil {
		cmd = real // scan made sure it stays in the build dir
	}
	for _, e := range m.Executables {
		p := filepath.Join(o.BuildDir, filepath.FromSlash(strings.TrimPrefix(e.Path, GameDir+"/")))
		why, err := cannotRunFromScratch(p)
		if err != nil {
			return fmt.Errorf("read %s: %w", p, err)
		}
		if why == "" {
			continue
		}
		if filepath.Clean(p) == filepath.Clean(cmd) {
			return fmt.Errorf("game command %s %s, and a docker image is built FROM scratch: build the game server statically (Go: CGO_ENABLED=0)", cmd, why)
		}
		o.Log.Warn("this executable cannot run in a docker image built FROM scratch", "path", p, "why", why)
	}
	return nil
}

// cannotRunFromScratch says why an executable would not start in an empty
// image ("" when nothing is known against it).
func cannotRunFromScratch(p string) (string, error) {
	interp, isELF, err := elfInterpreter(p)
	if err != nil {
		return "", err
	}
	if isELF {
		if interp != "" {
			return "is dynamically linked (it needs " + interp + ")", nil
		}
		return "", nil
	}
	f, err := os.Open(p)
	if err != nil {
		return "", err
	}
	defer f.Close()
	head := make([]byte, 128)
	n, _ := io.ReadFull(f, head)
	if line, ok := strings.CutPrefix(string(head[:n]), "#!"); ok {
		line, _, _ = strings.Cut(line, "\n")
		return "is a script for " + strings.TrimSpace(line), nil
	}
	return "", nil
}

// elfInterpreter reports whether the file is an ELF executable and, if it
// is dynamically linked, the program interpreter it needs.
func elfInterpreter(p string) (interp string, isELF bool, err error) {
	f, err := elf.Open(p)
	if err != nil {
		var fe *elf.FormatError
		if errors.As(err, &fe) {
			return "", false, nil
		}
		return "", false, err
	}
	defer f.Close()
	for _, prog := range f.Progs {
		if prog.Type != elf.PT_INTERP {
			continue
		}
		b, err := io.ReadAll(io.LimitReader(prog.Open(), 4096))
		if err != nil {
			return "", true, err
		}
		return strings.TrimRight(string(b), "\x00"), true, nil
	}
	return "", true, nil
}

// ParseManifest decodes a manifest as an image carries it (its label or
// its manifest file) and checks that it can only name files of the game
// build: an image's labels come from whoever built it.
func ParseManifest(raw []byte) (Manifest, error) {
	var m Manifest
	if err := json.Unmarshal(raw, &m); err != nil {
		return Manifest{}, fmt.Errorf("manifest: %w", err)
	}
	inGame := func(p string) bool {
		return strings.HasPrefix(p, GameDir+"/") && path.Clean(p) == p && !strings.ContainsRune(p, 0)
	}
	if len(m.Command) == 0 || !inGame(m.Command[0]) {
		return Manifest{}, fmt.Errorf("manifest: command %q: want an executable under %s", m.Command, GameDir)
	}
	for _, a := range m.Command {
		if strings.ContainsRune(a, 0) {
			return Manifest{}, errors.New("manifest: a command argument holds a NUL byte")
		}
	}
	for _, e := range m.Executables {
		if !inGame(e.Path) || strings.ContainsRune(e.Path, '=') {
			return Manifest{}, fmt.Errorf("manifest: executable %q: want a path under %s", e.Path, GameDir)
		}
		if b, err := hex.DecodeString(e.SHA256); err != nil || len(b) != sha256.Size || strings.ToLower(e.SHA256) != e.SHA256 {
			return Manifest{}, fmt.Errorf("manifest: executable %s: sha256 %q is not 64 lowercase hex digits", e.Path, e.SHA256)
		}
	}
	return m, nil
}
