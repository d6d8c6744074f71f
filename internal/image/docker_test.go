package image

import (
	"archive/tar"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/moby/moby/api/types/container"
	"github.com/moby/moby/client"
)

// dkTinyBin is a static program that reports what it may do in a docker
// image: its uid, whether it can write the LSPM's data dir and the game
// build. Built once per test binary.
var dkTinyBin = sync.OnceValues(func() (string, error) {
	dir, err := os.MkdirTemp("", "dedi-image-tiny-")
	if err != nil {
		return "", err
	}
	src := `package main

import (
	"fmt"
	"os"
)

func main() {
	try := func(p string) string {
		f, err := os.Create(p)
		if err != nil {
			return "denied"
		}
		f.Close()
		return "ok"
	}
	fmt.Printf("uid=%d data=%s game=%s\n", os.Getuid(), try("/dedi/data/x"), try("/opt/game/x"))
}
`
	if err := os.WriteFile(filepath.Join(dir, "main.go"), []byte(src), 0o644); err != nil {
		return "", err
	}
	if err := os.WriteFile(filepath.Join(dir, "go.mod"), []byte("module tiny\n\ngo 1.22\n"), 0o644); err != nil {
		return "", err
	}
	out := filepath.Join(dir, "tiny")
	cmd := exec.Command("go", "build", "-o", out, ".")
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0", "GOFLAGS=-mod=mod", "GOWORK=off")
	if b, err := cmd.CombinedOutput(); err != nil {
		return "", errors.New(string(b))
	}
	return out, nil
})

func dkTiny(t *testing.T) string {
	t.Helper()
	p, err := dkTinyBin()
	if err != nil {
		t.Fatalf("build a static test program: %v", err)
	}
	return p
}

// dockerClient returns a client of a running engine, or skips the test.
func dockerClient(t *testing.T) *client.Client {
	t.Helper()
	cli, err := NewDockerClient()
	if err == nil {
		ctx, cancel := context.WithTimeout(t.Context(), 5*time.Second)
		_, err = cli.Ping(ctx, client.PingOptions{NegotiateAPIVersion: true})
		cancel()
	}
	if err != nil {
		t.Skipf("no Docker engine can run here: %v", err)
	}
	t.Cleanup(func() { cli.Close() })
	return cli
}

func dkCopy(t *testing.T, src, dst string, mode os.FileMode) {
	t.Helper()
	b, err := os.ReadFile(src)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(filepath.Dir(dst), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(dst, b, mode); err != nil {
		t.Fatal(err)
	}
}

func dkSum(t *testing.T, p string) string {
	t.Helper()
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	h := sha256.Sum256(b)
	return hex.EncodeToString(h[:])
}

func dkRandName(t *testing.T, prefix string) string {
	t.Helper()
	b := make([]byte, 6)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return prefix + "-" + hex.EncodeToString(b)
}

// TestDockerBuild builds an image of a small game build and checks what
// the image holds: labels, manifest, files with their modes and owners,
// and that the game user can write its data dir but not the game build.
func TestDockerBuild(t *testing.T) {
	t.Parallel()
	cli := dockerClient(t)
	prog := dkTiny(t)
	build := t.TempDir()
	dkCopy(t, prog, filepath.Join(build, "server"), 0o700) // modes on disk are normalized
	dkCopy(t, prog, filepath.Join(build, "bin", "tool"), 0o750)
	if err := os.MkdirAll(filepath.Join(build, "maps"), 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(build, "maps", "arena.txt"), []byte("arena"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink("server", filepath.Join(build, "server-link")); err != nil {
		t.Fatal(err)
	}
	// The build dir is given through a symlink (as a "latest" link to a
	// CI build would be): it is read as the dir it names.
	linked := filepath.Join(t.TempDir(), "latest")
	if err := os.Symlink(build, linked); err != nil {
		t.Fatal(err)
	}
	name := dkRandName(t, "image-test")
	ref, err := Build(t.Context(), Options{Format: "docker", Name: name, BuildDir: linked, Command: []string{"server", "--map", "arena"},
		DediBinary: prog, DediVersion: "v-test", Log: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		for _, r := range []string{ref, DockerRepo(name) + ":latest"} {
			_, _ = cli.ImageRemove(context.Background(), r, client.ImageRemoveOptions{Force: true, PruneChildren: true})
		}
	})
	insp, err := cli.ImageInspect(t.Context(), ref)
	if err != nil {
		t.Fatal(err)
	}
	if want := DockerRepo(name) + ":" + strings.TrimPrefix(insp.ID, "sha256:")[:12]; ref != want {
		t.Errorf("reference %q, want %q", ref, want)
	}
	if !slices.Contains(insp.RepoTags, DockerRepo(name)+":latest") {
		t.Errorf("tags %v lack %s:latest", insp.RepoTags, DockerRepo(name))
	}
	cfg := insp.Config
	if cfg.User != DockerUser || !slices.Equal(cfg.Entrypoint, []string{DockerDedi}) {
		t.Errorf("image runs %v as %q", cfg.Entrypoint, cfg.User)
	}
	if cfg.Labels[LabelImage] != name || cfg.Labels[LabelVersion] != "v-test" {
		t.Errorf("labels %v", cfg.Labels)
	}
	m, err := ParseManifest([]byte(cfg.Labels[LabelManifest]))
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(m.Command, []string{"/opt/game/server", "--map", "arena"}) || m.Format != "docker" || m.Name != name || !slices.Equal(m.Ports, []string{"game"}) {
		t.Errorf("manifest %+v", m)
	}
	wantExec := []Executable{{Path: "/opt/game/bin/tool", SHA256: dkSum(t, prog)}, {Path: "/opt/game/server", SHA256: dkSum(t, prog)}}
	if !slices.Equal(m.Executables, wantExec) {
		t.Errorf("executables %+v, want %+v", m.Executables, wantExec)
	}
	if !slices.Equal(m.Allow(), []string{"/opt/game/bin/tool=" + dkSum(t, prog), "/opt/game/server=" + dkSum(t, prog)}) {
		t.Errorf("allow %v", m.Allow())
	}

	// The files, as a container of the image has them.
	created, err := cli.ContainerCreate(t.Context(), client.ContainerCreateOptions{Image: ref, Config: &container.Config{Tty: true}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_, _ = cli.ContainerRemove(context.Background(), created.ID, client.ContainerRemoveOptions{Force: true})
	})
	files := map[string]*tar.Header{}
	contents := map[string][]byte{}
	for _, dir := range []string{"/opt/game", "/dedi"} {
		res, err := cli.CopyFromContainer(t.Context(), created.ID, client.CopyFromContainerOptions{SourcePath: dir})
		if err != nil {
			t.Fatal(err)
		}
		tr := tar.NewReader(res.Content)
		for {
			h, err := tr.Next()
			if errors.Is(err, io.EOF) {
				break
			}
			if err != nil {
				t.Fatal(err)
			}
			files[strings.TrimSuffix(h.Name, "/")] = h
			contents[strings.TrimSuffix(h.Name, "/")], _ = io.ReadAll(tr)
		}
		res.Content.Close()
	}
	for name, want := range map[string]struct {
		mode     int64
		uid      int
		typeflag byte
	}{
		"game/server":         {0o755, 0, tar.TypeReg},
		"game/bin/tool":       {0o755, 0, tar.TypeReg},
		"game/maps/arena.txt": {0o644, 0, tar.TypeReg},
		"game/maps":           {0o755, 0, tar.TypeDir},
		"game/server-link":    {0o777, 0, tar.TypeSymlink},
		"dedi/dedi":           {0o755, 0, tar.TypeReg},
		"dedi/manifest.json":  {0o644, 0, tar.TypeReg},
		"dedi/data":           {0o755, 10001, tar.TypeDir}, // COPY makes the dir 0755
	} {
		h := files[name]
		if h == nil {
			t.Errorf("%s missing from the image (has %v)", name, dkKeys(files))
			continue
		}
		if h.Mode&0o7777 != want.mode || h.Uid != want.uid || h.Typeflag != want.typeflag {
			t.Errorf("%s: mode %o uid %d type %c, want %o %d %c", name, h.Mode&0o7777, h.Uid, h.Typeflag, want.mode, want.uid, want.typeflag)
		}
	}
	if string(contents["game/maps/arena.txt"]) != "arena" || files["game/server-link"].Linkname != "server" {
		t.Errorf("arena.txt = %q, server-link -> %q", contents["game/maps/arena.txt"], files["game/server-link"].Linkname)
	}
	var fileManifest Manifest
	if err := json.Unmarshal(contents["dedi/manifest.json"], &fileManifest); err != nil || !slices.Equal(fileManifest.Executables, m.Executables) {
		t.Errorf("manifest.json %s (%v), want the label's", contents["dedi/manifest.json"], err)
	}

	// Run as the image says: the game user writes its data dir, not the build.
	if _, err := cli.ContainerStart(t.Context(), created.ID, client.ContainerStartOptions{}); err != nil {
		t.Fatal(err)
	}
	wait := cli.ContainerWait(t.Context(), created.ID, client.ContainerWaitOptions{Condition: container.WaitConditionNotRunning})
	select {
	case err := <-wait.Error:
		t.Fatal(err)
	case <-wait.Result:
	}
	logs, err := cli.ContainerLogs(t.Context(), created.ID, client.ContainerLogsOptions{ShowStdout: true, ShowStderr: true})
	if err != nil {
		t.Fatal(err)
	}
	out, _ := io.ReadAll(logs)
	logs.Close()
	if got := strings.TrimSpace(string(out)); got != "uid=10001 data=ok game=denied" {
		t.Errorf("in the image the dedi binary says %q, want uid=10001 data=ok game=denied", got)
	}
}

func dkKeys(m map[string]*tar.Header) []string {
	var out []string
	for k := range m {
		out = append(out, k)
	}
	slices.Sort(out)
	return out
}

// TestDockerBuildRefuses: what cannot make a working FROM scratch image is
// refused before the engine is asked, with an error that says what to do.
func TestDockerBuildRefuses(t *testing.T) {
	t.Parallel()
	prog := dkTiny(t)
	dynamic := ""
	for _, p := range []string{"/bin/true", "/usr/bin/true", "/bin/ls"} {
		if interp, isELF, err := elfInterpreter(p); err == nil && isELF && interp != "" {
			dynamic = p
			break
		}
	}
	build := t.TempDir()
	dkCopy(t, prog, filepath.Join(build, "server"), 0o755)
	if err := os.WriteFile(filepath.Join(build, "run.sh"), []byte("#!/bin/sh\nexec ./server\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	opts := func(name string, cmd ...string) Options {
		return Options{Format: "docker", Name: name, BuildDir: build, Command: cmd, DediBinary: prog, Log: slog.New(slog.DiscardHandler)}
	}
	cases := map[string]struct {
		o    Options
		want string
	}{
		"script command":  {opts("ok", "run.sh"), "is a script for /bin/sh"},
		"bad docker name": {opts("a--b.", "server"), "cannot name a docker image"},
		"dedi not an ELF": {func() Options { o := opts("ok", "server"); o.DediBinary = filepath.Join(build, "run.sh"); return o }(), "not an ELF"},
		"no dedi":         {func() Options { o := opts("ok", "server"); o.DediBinary = ""; return o }(), "no dedi binary"},
	}
	// Symlinks that lead out of the build dir, or nowhere: each in a build of its own.
	for name, link := range map[string]struct{ cmd, target, want string }{
		"command symlink out of the build":  {"server-out", prog, "symlinks must stay inside the build dir"},
		"symlink out of the build":          {"server", "/etc", "does not lead to a file of the build dir"},
		"relative symlink out of the build": {"server", "../../x", "does not lead to a file of the build dir"},
		"dangling symlink":                  {"server", "nothing", "does not lead to a file of the build dir"},
	} {
		dir := t.TempDir()
		dkCopy(t, prog, filepath.Join(dir, "server"), 0o755)
		ln := filepath.Join(dir, "sub", "link")
		if link.cmd != "server" {
			ln = filepath.Join(dir, link.cmd)
		}
		if err := os.MkdirAll(filepath.Dir(ln), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.Symlink(link.target, ln); err != nil {
			t.Fatal(err)
		}
		o := opts("ok", link.cmd)
		o.BuildDir = dir
		cases[name] = struct {
			o    Options
			want string
		}{o, link.want}
	}
	if dynamic != "" {
		dkCopy(t, dynamic, filepath.Join(build, "dyn"), 0o755)
		if err := os.Symlink("dyn", filepath.Join(build, "dyn-link")); err != nil {
			t.Fatal(err)
		}
		cases["dynamic command behind a symlink"] = struct {
			o    Options
			want string
		}{opts("ok", "dyn-link"), "is dynamically linked"}
		cases["dynamic dedi"] = struct {
			o    Options
			want string
		}{func() Options { o := opts("ok", "server"); o.DediBinary = dynamic; return o }(), "CGO_ENABLED=0"}
		cases["dynamic command"] = struct {
			o    Options
			want string
		}{opts("ok", "dyn"), "is dynamically linked"}
	} else {
		t.Log("no dynamically linked executable found on this machine: those cases are not run")
	}
	for name, c := range cases {
		ref, err := Build(t.Context(), c.o)
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: Build: %v, want an error saying %q", name, err, c.want)
		}
		if err == nil { // built after all: leave no image behind
			for _, r := range []string{ref, DockerRepo(c.o.Name) + ":latest"} {
				_ = exec.Command("docker", "rmi", "-f", r).Run()
			}
		}
	}
}

func TestParseManifest(t *testing.T) {
	good := Manifest{Name: "echo", Format: "docker", Command: []string{"/opt/game/echo", "--x"},
		Executables: []Executable{{Path: "/opt/game/echo", SHA256: strings.Repeat("ab", 32)}}, Ports: []string{"game"}}
	raw, _ := json.Marshal(good)
	m, err := ParseManifest(raw)
	if err != nil || !slices.Equal(m.Command, good.Command) || !slices.Equal(m.Executables, good.Executables) {
		t.Fatalf("ParseManifest(good) = %+v, %v", m, err)
	}
	for name, mutate := range map[string]func(*Manifest){
		"no command":         func(m *Manifest) { m.Command = nil },
		"command outside":    func(m *Manifest) { m.Command = []string{"/bin/sh"} },
		"command dotdot":     func(m *Manifest) { m.Command = []string{"/opt/game/../../bin/sh"} },
		"command nul":        func(m *Manifest) { m.Command = []string{"/opt/game/echo", "a\x00b"} },
		"executable outside": func(m *Manifest) { m.Executables[0].Path = "/dedi/dedi" },
		"executable with =":  func(m *Manifest) { m.Executables[0].Path = "/opt/game/a=b" },
		"short hash":         func(m *Manifest) { m.Executables[0].SHA256 = "abcd" },
		"upper hash":         func(m *Manifest) { m.Executables[0].SHA256 = strings.Repeat("AB", 32) },
		"not hex":            func(m *Manifest) { m.Executables[0].SHA256 = strings.Repeat("zz", 32) },
	} {
		bad := good
		bad.Executables = slices.Clone(good.Executables)
		mutate(&bad)
		raw, _ := json.Marshal(bad)
		if _, err := ParseManifest(raw); err == nil {
			t.Errorf("%s: ParseManifest accepted %s", name, raw)
		}
	}
	if _, err := ParseManifest([]byte(`{"command": 3}`)); err == nil {
		t.Error("ParseManifest accepted a command of the wrong type")
	}
}

// FuzzParseManifest: whatever an image's label holds, ParseManifest
// either refuses it or returns a manifest that names only files of the
// game build, which the LSPM's --allow can take.
func FuzzParseManifest(f *testing.F) {
	f.Add([]byte(`{"name":"echo","format":"docker","command":["/opt/game/echo"],"executables":[{"path":"/opt/game/echo","sha256":"` + strings.Repeat("0", 64) + `"}],"ports":["game"]}`))
	f.Add([]byte(`{"command":["/opt/game/a/../b"]}`))
	f.Add([]byte(`{"command":["/opt/game/x"],"executables":[{"path":"/opt/game/x=y","sha256":""}]}`))
	f.Add([]byte(`null`))
	f.Fuzz(func(t *testing.T, raw []byte) {
		m, err := ParseManifest(raw)
		if err != nil {
			return
		}
		if !strings.HasPrefix(m.Command[0], GameDir+"/") || filepath.Clean(m.Command[0]) != m.Command[0] {
			t.Fatalf("accepted command %q", m.Command)
		}
		for _, a := range m.Allow() {
			p, h, ok := strings.Cut(a, "=")
			if !ok || !strings.HasPrefix(p, GameDir+"/") || strings.Contains(h, "=") || len(h) != 64 {
				t.Fatalf("accepted allow %q", a)
			}
		}
	})
}
