// Package rest owns the HTTP conventions of API.md shared by the LSPM and the
// VMM: the error kinds and their one mapping to status and problem code,
// problem+json answers, strict JSON decoding of bounded bodies, and bearer
// tokens.
package rest

import (
	"bytes"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"path"
	"reflect"
	"strings"
	"sync"

	"dedi.dev/dedi/api"
)

// MaxBody is the largest request body accepted (API.md: 1 MiB, else 413).
const MaxBody = 1 << 20

// Kind is the small set of error kinds that map to HTTP answers.
type Kind int

// The error kinds. Each maps to exactly one HTTP status in Status.
const (
	Internal Kind = iota
	Invalid
	NotFound
	Conflict
	Unavailable
	Forbidden
	Unauthorized
	TooLarge
	Timeout
	UnsupportedMedia
	MethodNotAllowed
)

// Status is the one place where an error kind becomes an HTTP status.
func (k Kind) Status() int {
	switch k {
	case Invalid:
		return http.StatusBadRequest
	case NotFound:
		return http.StatusNotFound
	case Conflict:
		return http.StatusConflict
	case Unavailable:
		return http.StatusServiceUnavailable
	case Forbidden:
		return http.StatusForbidden
	case Unauthorized:
		return http.StatusUnauthorized
	case TooLarge:
		return http.StatusRequestEntityTooLarge
	case Timeout:
		return http.StatusGatewayTimeout
	case UnsupportedMedia:
		return http.StatusUnsupportedMediaType
	case MethodNotAllowed:
		return http.StatusMethodNotAllowed
	}
	return http.StatusInternalServerError
}

// defaultCode is the problem code of a kind when the error names none.
func (k Kind) defaultCode() string {
	switch k {
	case Invalid:
		return api.CodeInvalid
	case NotFound:
		return api.CodeNotFound
	case Conflict:
		return "conflict"
	case Unavailable:
		return "unavailable"
	case Forbidden:
		return api.CodeForbidden
	case Unauthorized:
		return api.CodeUnauthorized
	case TooLarge:
		return api.CodeTooLarge
	case Timeout:
		return api.CodeTimeout
	case UnsupportedMedia:
		return api.CodeUnsupportedMedia
	case MethodNotAllowed:
		return api.CodeMethodNotAllowed
	}
	return api.CodeInternal
}

// Error is an error with a kind and a stable problem code.
type Error struct {
	Kind   Kind
	Code   string
	Detail string
	// RetryAfter is the Retry-After seconds of a 503 (default 1).
	RetryAfter int
}

func (e *Error) Error() string { return e.Code + ": " + e.Detail }

// Errorf makes an *Error; an empty code takes the kind's default.
func Errorf(kind Kind, code, format string, args ...any) *Error {
	if code == "" {
		code = kind.defaultCode()
	}
	return &Error{Kind: kind, Code: code, Detail: fmt.Sprintf(format, args...)}
}

// WriteJSON answers status with v as JSON.
func WriteJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	enc := json.NewEncoder(w)
	_ = enc.Encode(v) // the client went away; nothing to do
}

// WriteError answers err as problem+json. Errors that are not *Error become
// a 500 whose detail hides the internals.
func WriteError(w http.ResponseWriter, err error) {
	var e *Error
	if !errors.As(err, &e) {
		e = &Error{Kind: Internal, Code: api.CodeInternal, Detail: "internal error"}
	}
	status := e.Kind.Status()
	p := api.Problem{
		Type:   "https://dedi.dev/problems/" + e.Code,
		Title:  http.StatusText(status),
		Status: status,
		Detail: e.Detail,
		Code:   e.Code,
	}
	h := w.Header()
	h.Set("Content-Type", "application/problem+json")
	switch status {
	case http.StatusUnauthorized:
		h.Set("WWW-Authenticate", `Bearer realm="dedi"`)
	case http.StatusServiceUnavailable:
		ra := e.RetryAfter
		if ra <= 0 {
			ra = 1
		}
		h.Set("Retry-After", fmt.Sprint(ra))
	}
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(p)
}

// DecodeJSON reads a bounded body strictly into v: it must be JSON, at most
// MaxBody bytes, one value, with no unknown fields. The Content-Type is not
// enforced (curl -d sends a form type); the body itself must be JSON. An empty body is allowed
// only when optional is true (v is then left as it is).
func DecodeJSON(r *http.Request, v any, optional bool) error {
	body, err := ReadBody(r)
	if err != nil {
		return err
	}
	return DecodeBytes(body, v, optional)
}

// ReadBody reads a request body of at most MaxBody bytes.
func ReadBody(r *http.Request) ([]byte, error) { return ReadBodyInto(r, nil) }

// ReadBodyInto is ReadBody into buf's storage when it is large enough.
func ReadBodyInto(r *http.Request, buf []byte) ([]byte, error) {
	if r.ContentLength > MaxBody {
		return nil, Errorf(TooLarge, "", "body is over %d bytes", MaxBody)
	}
	// Sized to the declared length, the body is read without regrowing:
	// status reports arrive 2,000 a second.
	size := 512
	if r.ContentLength > 0 {
		size = int(r.ContentLength) + 1 // +1: room for the read that sees EOF
	}
	body := buf[:0]
	if cap(body) < size {
		body = make([]byte, 0, size)
	}
	lr := io.LimitReader(r.Body, MaxBody+1)
	for {
		if len(body) == cap(body) {
			body = append(body, 0)[:len(body)]
		}
		n, err := lr.Read(body[len(body):cap(body)])
		body = body[:len(body)+n]
		if err == io.EOF {
			break
		}
		if err != nil {
			return nil, Errorf(Invalid, "", "read body: %v", err)
		}
	}
	if len(body) > MaxBody {
		return nil, Errorf(TooLarge, "", "body is over %d bytes", MaxBody)
	}
	return body, nil
}

// DecodeBytes is DecodeJSON's strict decoder on a body already read; it is
// the function the fuzz tests drive.
func DecodeBytes(body []byte, v any, optional bool) error {
	if len(bytes.TrimSpace(body)) == 0 {
		if optional {
			return nil
		}
		return Errorf(Invalid, "", "a JSON body is required")
	}
	// Unmarshal checks the whole body is one valid JSON value before it
	// decodes (trailing data is a syntax error); unknown fields are caught
	// by the key scan below, which knows the exact names.
	if err := json.Unmarshal(body, v); err != nil {
		return Errorf(Invalid, "", "body: %s", describeJSONError(err))
	}
	// encoding/json matches field names without regard to case; the
	// contract's names are exact, so "Command" is an unknown field. The
	// body is valid JSON by now: one scan over its bytes, guided by v's
	// type, checks every object key (no second decode).
	sc := keyScanner{b: body}
	if path, bad := sc.value(reflect.TypeOf(v)); bad {
		return Errorf(Invalid, "", "body: unknown field %q (field names are case-sensitive)", path)
	}
	return nil
}

// fieldSets caches the exact JSON names of each struct type's fields.
var fieldSets sync.Map // reflect.Type -> map[string]reflect.Type

func fieldsOf(t reflect.Type) map[string]reflect.Type {
	if f, ok := fieldSets.Load(t); ok {
		return f.(map[string]reflect.Type)
	}
	fields := map[string]reflect.Type{}
	for i := 0; i < t.NumField(); i++ {
		f := t.Field(i)
		name, _, _ := strings.Cut(f.Tag.Get("json"), ",")
		if name == "-" || !f.IsExported() {
			continue
		}
		if name == "" {
			name = f.Name
		}
		fields[name] = f.Type
	}
	fieldSets.Store(t, fields)
	return fields
}

// keyScanner walks valid JSON and reports the first object key that names
// no field of the struct it decodes into.
type keyScanner struct {
	b []byte
	i int
}

func (s *keyScanner) ws() {
	for s.i < len(s.b) && (s.b[s.i] == ' ' || s.b[s.i] == '\t' || s.b[s.i] == '\n' || s.b[s.i] == '\r') {
		s.i++
	}
}

// str reads a string at s.i (its opening quote) and returns it unescaped.
func (s *keyScanner) str() string {
	start := s.i
	s.i++
	escaped := false
	for s.i < len(s.b) && s.b[s.i] != '"' {
		if s.b[s.i] == '\\' {
			escaped = true
			s.i++
		}
		s.i++
	}
	s.i++
	raw := s.b[start:min(s.i, len(s.b))]
	if !escaped {
		return string(raw[1 : len(raw)-1])
	}
	var out string
	_ = json.Unmarshal(raw, &out)
	return out
}

// value checks the value at s.i against t and reports the first inexact
// key in it, with its path. The path alone cannot say so: "" is a key
// too, and taking it for "all keys exact" once left the scan in the
// middle of an object, where an array's loop spun on its '}' for ever.
func (s *keyScanner) value(t reflect.Type) (path string, bad bool) {
	for t != nil && t.Kind() == reflect.Pointer {
		t = t.Elem()
	}
	s.ws()
	if s.i >= len(s.b) {
		return "", false
	}
	switch s.b[s.i] {
	case '{':
		s.i++
		var fields map[string]reflect.Type
		var elem reflect.Type
		if t != nil {
			switch t.Kind() {
			case reflect.Struct:
				fields = fieldsOf(t)
			case reflect.Map:
				elem = t.Elem()
			}
		}
		for {
			s.ws()
			if s.i >= len(s.b) || s.b[s.i] == '}' {
				s.i++
				return "", false
			}
			if s.b[s.i] == ',' {
				s.i++
				continue
			}
			key := s.str()
			s.ws()
			s.i++ // ':'
			sub := elem
			if fields != nil {
				ft, ok := fields[key]
				if !ok {
					return key, true
				}
				sub = ft
			}
			if p, bad := s.value(sub); bad {
				return key + "." + p, true
			}
		}
	case '[':
		s.i++
		var elem reflect.Type
		if t != nil && (t.Kind() == reflect.Slice || t.Kind() == reflect.Array) {
			elem = t.Elem()
		}
		for n := 0; ; {
			s.ws()
			if s.i >= len(s.b) || s.b[s.i] == ']' {
				s.i++
				return "", false
			}
			if s.b[s.i] == ',' {
				s.i++
				n++
				continue
			}
			if p, bad := s.value(elem); bad {
				return fmt.Sprintf("%d.%s", n, p), true
			}
		}
	case '"':
		s.str()
	default: // number, true, false, null
		for s.i < len(s.b) && !strings.ContainsRune(",}] \t\n\r", rune(s.b[s.i])) {
			s.i++
		}
	}
	return "", false
}

// BearerToken returns the token of an Authorization: Bearer header, or "".
func BearerToken(r *http.Request) string {
	h := r.Header.Get("Authorization")
	const prefix = "bearer "
	if len(h) <= len(prefix) || !strings.EqualFold(h[:len(prefix)], prefix) {
		return ""
	}
	return strings.TrimSpace(h[len(prefix):])
}

// TokenHash is the stored form of a token: hex SHA-256.
func TokenHash(token string) string {
	sum := sha256.Sum256([]byte(token))
	return hex.EncodeToString(sum[:])
}

// TokenEqual compares two secrets in constant time.
func TokenEqual(a, b string) bool {
	if a == "" || b == "" {
		return false
	}
	return subtle.ConstantTimeCompare([]byte(a), []byte(b)) == 1
}

// ErrUnauthorized is the answer to a missing or wrong token.
func ErrUnauthorized() *Error {
	return Errorf(Unauthorized, "", "a valid bearer token is required")
}

// ErrForbidden is the answer to a valid token used where it has no right.
func ErrForbidden(what string) *Error {
	return Errorf(Forbidden, "", "this token may not %s", what)
}

// NotFoundHandler answers unknown paths with problem+json.
func NotFoundHandler(w http.ResponseWriter, r *http.Request) {
	WriteError(w, Errorf(NotFound, "", "no route %s %s", r.Method, r.URL.Path))
}

// Problems wraps a mux so that every answer it makes itself is problem+json
// too: unknown paths (404), wrong methods (405 with Allow), untidy paths
// (the mux would redirect /v1//x with an HTML page; the API has no such
// paths), and a panic (500, logged).
func Problems(mux *http.ServeMux, log *slog.Logger) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		defer func() {
			if v := recover(); v != nil {
				if v == http.ErrAbortHandler {
					panic(v)
				}
				log.Error("panic in handler", "method", r.Method, "path", r.URL.Path, "panic", fmt.Sprint(v))
				WriteError(w, nil)
			}
		}()
		if p := r.URL.Path; p == "" || p[0] != '/' || path.Clean(p) != p {
			NotFoundHandler(w, r)
			return
		}
		h, pattern := mux.Handler(r)
		if pattern == "" {
			rec := httptest.NewRecorder()
			h.ServeHTTP(rec, r)
			if rec.Code == http.StatusMethodNotAllowed {
				w.Header().Set("Allow", rec.Header().Get("Allow"))
				WriteError(w, Errorf(MethodNotAllowed, "", "%s is not allowed on %s", r.Method, r.URL.Path))
				return
			}
			NotFoundHandler(w, r)
			return
		}
		mux.ServeHTTP(w, r)
	})
}
func describeJSONError(err error) string {
	var se *json.SyntaxError
	var te *json.UnmarshalTypeError
	switch {
	case errors.As(err, &se):
		return fmt.Sprintf("malformed JSON at byte %d: %v", se.Offset, err)
	case errors.As(err, &te):
		if te.Field != "" {
			return fmt.Sprintf("field %q must be %s, not %s", te.Field, te.Type, te.Value)
		}
		return fmt.Sprintf("must be %s, not %s", te.Type, te.Value)
	case errors.Is(err, io.ErrUnexpectedEOF):
		return "truncated JSON"
	}
	return err.Error()
}

// Healthz answers GET /healthz, the one route without a token.
func Healthz(w http.ResponseWriter, _ *http.Request) {
	WriteJSON(w, http.StatusOK, map[string]string{"status": "ok"})
}
