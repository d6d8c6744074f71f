// Package names checks the ids and names of API.md by hand rather than
// with regular expressions. Compiling a bounded repetition such as
// {0,127} expands it 127 times, and every start of dedi paid for the
// package-level patterns: a quarter of its start-up work, which under
// emulation (a qemu guest's init, LSPM and each game's shim, all dedi)
// came to a tenth of a second per start. names_test.go checks each
// function against the pattern it stands for.
package names

// ID is a machine or process id: [A-Za-z0-9][A-Za-z0-9._-]{0,127}.
func ID(s string) bool { return idOf(s, 128) }

// DockerInstance is a docker provider instance label: an ID of at most 64.
func DockerInstance(s string) bool { return idOf(s, 64) }

func idOf(s string, max int) bool {
	if s == "" || len(s) > max {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case c >= 'a' && c <= 'z', c >= 'A' && c <= 'Z', c >= '0' && c <= '9':
		case i > 0 && (c == '.' || c == '_' || c == '-'):
		default:
			return false
		}
	}
	return true
}

// Fleet is a fleet name, a DNS label: [a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?.
func Fleet(s string) bool {
	if s == "" || len(s) > 63 || s[0] == '-' || s[len(s)-1] == '-' {
		return false
	}
	for i := 0; i < len(s); i++ {
		if c := s[i]; !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '-') {
			return false
		}
	}
	return true
}

// Port is a port name: [a-z][a-z0-9_]{0,31}.
func Port(s string) bool {
	if s == "" || len(s) > 32 || s[0] < 'a' || s[0] > 'z' {
		return false
	}
	for i := 1; i < len(s); i++ {
		if c := s[i]; !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '_') {
			return false
		}
	}
	return true
}

// Env is an environment variable name: [A-Za-z_][A-Za-z0-9_]{0,127}.
func Env(s string) bool {
	if s == "" || len(s) > 128 || s[0] >= '0' && s[0] <= '9' {
		return false
	}
	for i := 0; i < len(s); i++ {
		if c := s[i]; !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '_') {
			return false
		}
	}
	return true
}

// SHA256 is a lower-case hex SHA-256: [0-9a-f]{64}.
func SHA256(s string) bool {
	if len(s) != 64 {
		return false
	}
	for i := 0; i < len(s); i++ {
		if c := s[i]; !(c >= '0' && c <= '9' || c >= 'a' && c <= 'f') {
			return false
		}
	}
	return true
}
