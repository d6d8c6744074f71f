module dedi.dev/dedi

go 1.26.8

require (
	github.com/google/uuid v1.6.0
	golang.org/x/sys v0.50.0
)
