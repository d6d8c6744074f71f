package rest

import (
	"errors"
	"testing"
	"time"

	"dedi.dev/dedi/api"
)

// TestDecodeBytesEmptyKey: "" is a key like any other, refused where no
// field has that name. The key scan once took it for "every key exact":
// at the top of a body it let the key through, in a nested object it
// went on from the middle of that object, and in an object inside an
// array it never returned (FuzzStatusReport hung on the third body).
func TestDecodeBytesEmptyKey(t *testing.T) {
	for _, body := range []string{
		`{"": 1}`,
		`{"hardware": {"": 1}}`,
		`{"processes": [{"": ""}]}`,
		`{"ended": [{"id": "p-1"}, {"id": "p-2", "": null}], "seq": 1}`,
	} {
		t.Run(body, func(t *testing.T) {
			done := make(chan error, 1)
			go func() { done <- DecodeBytes([]byte(body), new(api.Status), false) }()
			select {
			case err := <-done:
				var e *Error
				if !errors.As(err, &e) || e.Kind != Invalid {
					t.Fatalf("DecodeBytes: %v, want an invalid *Error", err)
				}
			case <-time.After(5 * time.Second):
				t.Fatal("DecodeBytes did not return")
			}
		})
	}
}
