// Package agonespb holds the protobuf messages and the gRPC service of
// Agones' game server SDK (package agones.dev.sdk), and in alpha/ its alpha
// service (agones.dev.sdk.alpha, player tracking), so that dedi's LSPM can
// serve the official Agones SDK clients unchanged (docs/AGONES.md).
//
// The .proto files were written for dedi from Agones' documented interface:
// same proto packages, service and method names, and message field numbers
// as the official clients use. Agones' own Go module is not used. The Go
// code next to them is generated and committed; to regenerate it, with
// protoc (Debian's protobuf-compiler) and the two plugins on PATH:
//
//	go install google.golang.org/protobuf/cmd/protoc-gen-go@v1.36.12
//	go install google.golang.org/grpc/cmd/protoc-gen-go-grpc@v1.6.2
//	go generate ./internal/agonespb
package agonespb

//go:generate protoc -I . --go_out=. --go_opt=paths=source_relative --go-grpc_out=. --go-grpc_opt=paths=source_relative sdk.proto alpha/alpha.proto
