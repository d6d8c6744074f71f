package names

import (
	"regexp"
	"strings"
	"testing"
)

// The patterns the functions stand for, as API.md and the flags give them.
var patterns = []struct {
	name string
	re   *regexp.Regexp
	fn   func(string) bool
}{
	{"ID", regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$`), ID},
	{"DockerInstance", regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$`), DockerInstance},
	{"Fleet", regexp.MustCompile(`^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$`), Fleet},
	{"Port", regexp.MustCompile(`^[a-z][a-z0-9_]{0,31}$`), Port},
	{"Env", regexp.MustCompile(`^[A-Za-z_][A-Za-z0-9_]{0,127}$`), Env},
	{"SHA256", regexp.MustCompile(`^[0-9a-f]{64}$`), SHA256},
}

func check(t *testing.T, s string) {
	t.Helper()
	for _, p := range patterns {
		// $ in Go's regexp matches only at the very end (no multi-line),
		// so the pattern and the function must agree on every string.
		if want, got := p.re.MatchString(s), p.fn(s); got != want {
			t.Errorf("%s(%q) = %v, the pattern says %v", p.name, s, got, want)
		}
	}
}

func TestNamesMatchTheirPatterns(t *testing.T) {
	for _, s := range []string{"", "a", "A", "0", "_", "-", ".", "a-", "-a", "a.b_c-d", "p-1", "game", "game_2", "Game",
		"2game", "GAME_PORT", "_x", "m-0123", "a\n", "a\x00", "é", "ab cd", strings.Repeat("a", 31), strings.Repeat("a", 32),
		strings.Repeat("a", 33), strings.Repeat("a", 63), strings.Repeat("a", 64), strings.Repeat("a", 65),
		strings.Repeat("a", 127), strings.Repeat("a", 128), strings.Repeat("a", 129), strings.Repeat("0f", 32),
		strings.Repeat("0F", 32), strings.Repeat("0f", 32) + "0", "a-" + strings.Repeat("b", 61), "a" + strings.Repeat("-", 61) + "b"} {
		check(t, s)
	}
}

func FuzzNames(f *testing.F) {
	for _, s := range []string{"p-1", "game", "GAME_PORT", "a-b", strings.Repeat("ab", 32), "-", ""} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) { check(t, s) })
}
