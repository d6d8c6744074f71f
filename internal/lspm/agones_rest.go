package lspm

// The REST side of the Agones SDK on AGONES_SDK_HTTP_PORT, answering as
// Agones' grpc-gateway does: bodies are protojson of the gRPC messages
// (proto field names, e.g. "object_meta"; int64 as strings; every field
// present), unknown request fields are ignored, errors are
// {"code": <gRPC code>, "message": "...", "details": []} with the
// gateway's HTTP status for that code, and GET /watch/gameserver streams
// one {"result": GameServer} line per change.

import (
	"bytes"
	"context"
	"io"
	"log/slog"
	"net"
	"net/http"
	"strings"
	"sync"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"

	"dedi.dev/dedi/internal/agonespb"
	"dedi.dev/dedi/internal/agonespb/alpha"
	"dedi.dev/dedi/internal/rest"
)

// The gateway's JSON options, as Agones configures them.
var (
	agonesMarshal   = protojson.MarshalOptions{UseProtoNames: true, EmitUnpopulated: true}
	agonesUnmarshal = protojson.UnmarshalOptions{DiscardUnknown: true}
)

// maxAgonesBody caps a REST request body.
const maxAgonesBody = 1 << 20

// restCall is one REST route of the Agones SDK.
type restCall struct {
	name     string               // Agones' name of the call
	in       func() proto.Message // the request message a body decodes into
	validate func(proto.Message) error
	run      func(s *agonesServer, in proto.Message) (proto.Message, error)
}

func emptyIn() proto.Message                { return &agonespb.Empty{} }
func keyValueIn() proto.Message             { return &agonespb.KeyValue{} }
func playerIDIn() proto.Message             { return &alpha.PlayerID{} }
func noCheck(proto.Message) error           { return nil }
func none(err error) (proto.Message, error) { return &agonespb.Empty{}, err }

// restCalls are the routes by "METHOD PATH".
var restCalls = map[string]restCall{
	"POST /ready": {name: "Ready", in: emptyIn, validate: noCheck,
		run: func(s *agonesServer, _ proto.Message) (proto.Message, error) { return none(s.Ready()) }},
	"POST /allocate": {name: "Allocate", in: emptyIn, validate: noCheck,
		run: func(s *agonesServer, _ proto.Message) (proto.Message, error) { return none(s.Allocate()) }},
	"POST /shutdown": {name: "Shutdown", in: emptyIn, validate: noCheck,
		run: func(s *agonesServer, _ proto.Message) (proto.Message, error) { return none(s.Shutdown()) }},
	"POST /health": {name: "Health", in: emptyIn, validate: noCheck,
		run: func(s *agonesServer, _ proto.Message) (proto.Message, error) { return none(s.Health()) }},
	"POST /reserve": {name: "Reserve", in: func() proto.Message { return &agonespb.Duration{} },
		validate: func(m proto.Message) error {
			if n := m.(*agonespb.Duration).GetSeconds(); n < 0 || n > maxAgonesReserveSecs {
				return status.Errorf(codes.InvalidArgument, "seconds must be from 0 to %d", maxAgonesReserveSecs)
			}
			return nil
		},
		run: func(s *agonesServer, m proto.Message) (proto.Message, error) {
			return none(s.Reserve(m.(*agonespb.Duration).GetSeconds()))
		}},
	"GET /gameserver": {name: "GetGameServer",
		run: func(s *agonesServer, _ proto.Message) (proto.Message, error) {
			gs, _, err := s.GameServer()
			return gs, err
		}},
	"PUT /metadata/label": {name: "SetLabel", in: keyValueIn,
		validate: func(m proto.Message) error {
			kv := m.(*agonespb.KeyValue)
			return validateAgonesLabel(kv.GetKey(), kv.GetValue())
		},
		run: func(s *agonesServer, m proto.Message) (proto.Message, error) {
			kv := m.(*agonespb.KeyValue)
			return none(s.SetLabel(kv.GetKey(), kv.GetValue()))
		}},
	"PUT /metadata/annotation": {name: "SetAnnotation", in: keyValueIn,
		validate: func(m proto.Message) error {
			kv := m.(*agonespb.KeyValue)
			return validateAgonesAnnotation(kv.GetKey(), kv.GetValue())
		},
		run: func(s *agonesServer, m proto.Message) (proto.Message, error) {
			kv := m.(*agonespb.KeyValue)
			return none(s.SetAnnotation(kv.GetKey(), kv.GetValue()))
		}},
	"POST /alpha/player/connect": {name: "PlayerConnect", in: playerIDIn,
		validate: func(m proto.Message) error { return validatePlayerID(m.(*alpha.PlayerID).GetPlayerID()) },
		run: func(s *agonesServer, m proto.Message) (proto.Message, error) {
			ok, err := s.PlayerConnect(m.(*alpha.PlayerID).GetPlayerID())
			return &alpha.Bool{Bool: ok}, err
		}},
	"POST /alpha/player/disconnect": {name: "PlayerDisconnect", in: playerIDIn,
		validate: func(m proto.Message) error { return validatePlayerID(m.(*alpha.PlayerID).GetPlayerID()) },
		run: func(s *agonesServer, m proto.Message) (proto.Message, error) {
			ok, err := s.PlayerDisconnect(m.(*alpha.PlayerID).GetPlayerID())
			return &alpha.Bool{Bool: ok}, err
		}},
	"PUT /alpha/player/capacity": {name: "SetPlayerCapacity", in: func() proto.Message { return &alpha.Count{} },
		validate: func(m proto.Message) error {
			if n := m.(*alpha.Count).GetCount(); n < 0 || n > maxAgonesCapacity {
				return status.Errorf(codes.InvalidArgument, "count must be from 0 to %d", maxAgonesCapacity)
			}
			return nil
		},
		run: func(s *agonesServer, m proto.Message) (proto.Message, error) {
			return &alpha.Empty{}, s.SetPlayerCapacity(m.(*alpha.Count).GetCount())
		}},
	"GET /alpha/player/capacity": {name: "GetPlayerCapacity",
		run: func(s *agonesServer, _ proto.Message) (proto.Message, error) {
			_, c, err := s.players()
			return &alpha.Count{Count: c}, err
		}},
	"GET /alpha/player/count": {name: "GetPlayerCount",
		run: func(s *agonesServer, _ proto.Message) (proto.Message, error) {
			ids, _, err := s.players()
			return &alpha.Count{Count: int64(len(ids))}, err
		}},
	"GET /alpha/player/connected": {name: "GetConnectedPlayers",
		run: func(s *agonesServer, _ proto.Message) (proto.Message, error) {
			ids, _, err := s.players()
			return &alpha.PlayerIDList{List: ids}, err
		}},
	// GET /alpha/player/connected/{playerID} is matched by prefix.
	"GET /alpha/player/connected/": {name: "IsPlayerConnected",
		validate: func(m proto.Message) error { return validatePlayerID(m.(*alpha.PlayerID).GetPlayerID()) },
		run: func(s *agonesServer, m proto.Message) (proto.Message, error) {
			ids, _, err := s.players()
			want := m.(*alpha.PlayerID).GetPlayerID()
			for _, id := range ids {
				if id == want {
					return &alpha.Bool{Bool: true}, err
				}
			}
			return &alpha.Bool{Bool: false}, err
		}},
}

// restPaths are the known paths, to tell a wrong method from an unknown path.
var restPaths = func() map[string]bool {
	m := map[string]bool{"/watch/gameserver": true} // served by watchREST
	for k := range restCalls {
		_, path, _ := strings.Cut(k, " ")
		m[path] = true
	}
	return m
}()

// decodeAgonesRequest finds the route of a REST request and decodes and
// checks its body as the gateway would; it does no I/O. Its errors are
// gRPC statuses: NotFound (no such path), Unimplemented (a wrong method,
// or a call dedi does not implement), InvalidArgument (a bad body).
func decodeAgonesRequest(method, path string, body []byte) (restCall, proto.Message, error) {
	key := method + " " + path
	var in proto.Message
	if id, ok := strings.CutPrefix(path, "/alpha/player/connected/"); ok && id != "" {
		if method != http.MethodGet {
			return restCall{}, nil, status.Error(codes.Unimplemented, http.StatusText(http.StatusMethodNotAllowed))
		}
		key, in = "GET /alpha/player/connected/", &alpha.PlayerID{PlayerID: id}
	}
	call, ok := restCalls[key]
	if !ok {
		if name := countersListsCall(method, path); name != "" {
			return restCall{}, nil, status.Error(codes.Unimplemented, unimplementedCall(name))
		}
		if restPaths[path] {
			return restCall{}, nil, status.Error(codes.Unimplemented, http.StatusText(http.StatusMethodNotAllowed))
		}
		return restCall{}, nil, status.Error(codes.NotFound, http.StatusText(http.StatusNotFound))
	}
	if call.in != nil {
		in = call.in()
		// Like the gateway: an empty body is an empty message.
		if len(bytes.TrimSpace(body)) > 0 {
			if err := agonesUnmarshal.Unmarshal(body, in); err != nil {
				return restCall{}, nil, status.Error(codes.InvalidArgument, err.Error())
			}
		}
	}
	if call.validate != nil {
		if err := call.validate(in); err != nil {
			return restCall{}, nil, err
		}
	}
	return call, in, nil
}

// countersListsCall names the Agones beta call (counters and lists) that a
// REST request is, or "".
func countersListsCall(method, path string) string {
	for _, v := range []string{"/v1beta1/", "/v1alpha1/"} {
		rest, ok := strings.CutPrefix(path, v)
		if !ok {
			continue
		}
		kind, name, _ := strings.Cut(rest, "/")
		call := ""
		switch {
		case kind == "counters" && method == http.MethodGet:
			call = "GetCounter"
		case kind == "counters" && method == http.MethodPatch:
			call = "UpdateCounter"
		case kind == "lists" && strings.HasSuffix(name, ":addValue"):
			call = "AddListValue"
		case kind == "lists" && strings.HasSuffix(name, ":removeValue"):
			call = "RemoveListValue"
		case kind == "lists" && method == http.MethodGet:
			call = "GetList"
		case kind == "lists" && method == http.MethodPatch:
			call = "UpdateList"
		case kind == "counters" || kind == "lists":
			call = kind
		default:
			return ""
		}
		return "agones.dev.sdk.beta.SDK/" + call
	}
	return ""
}

// connVerdict is the peer check of one HTTP connection, made on its first
// request.
type connVerdict struct {
	once sync.Once
	conn net.Conn
	err  error
}

type connVerdictKey struct{}

// httpServer builds the process's REST gateway.
func (s *agonesServer) httpServer() *http.Server {
	return &http.Server{
		Handler:           s,
		ReadHeaderTimeout: 10 * time.Second,
		IdleTimeout:       2 * time.Minute,
		ConnContext: func(ctx context.Context, c net.Conn) context.Context {
			return context.WithValue(ctx, connVerdictKey{}, &connVerdict{conn: c})
		},
		ErrorLog: slog.NewLogLogger(s.log.Handler(), slog.LevelWarn),
	}
}

// agonesHTTPStopWait is how long a stopping REST gateway lets the requests
// in flight finish before it closes their connections. Once the LSPM's
// loop has stopped they answer at once (Unavailable), and a watch ends
// with its context: only a client that stalls mid-request waits it out.
const agonesHTTPStopWait = time.Second

// ServeHTTP answers one REST request of the Agones SDK.
func (s *agonesServer) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if v, ok := r.Context().Value(connVerdictKey{}).(*connVerdict); ok {
		v.once.Do(func() { v.err = s.owner.checkPeer(v.conn) })
		if v.err != nil {
			writeAgonesError(w, status.Errorf(codes.PermissionDenied, "process %s: %v", s.id, v.err))
			return
		}
	} else {
		writeAgonesError(w, status.Error(codes.PermissionDenied, "no peer check"))
		return
	}
	var body []byte
	if r.Method != http.MethodGet && r.Method != http.MethodHead {
		b, err := io.ReadAll(io.LimitReader(r.Body, maxAgonesBody+1))
		if err != nil {
			writeAgonesError(w, status.Errorf(codes.InvalidArgument, "read body: %v", err))
			return
		}
		if len(b) > maxAgonesBody {
			writeAgonesError(w, status.Errorf(codes.InvalidArgument, "the body is larger than %d bytes", maxAgonesBody))
			return
		}
		body = b
	}
	if r.Method == http.MethodGet && r.URL.Path == "/watch/gameserver" {
		s.watchREST(w, r)
		return
	}
	call, in, err := decodeAgonesRequest(r.Method, r.URL.Path, body)
	if err != nil {
		writeAgonesError(w, err)
		return
	}
	out, err := call.run(s, in)
	if err != nil {
		writeAgonesError(w, err)
		return
	}
	b, err := agonesMarshal.Marshal(out)
	if err != nil {
		writeAgonesError(w, status.Error(codes.Internal, err.Error()))
		return
	}
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(http.StatusOK)
	_, _ = w.Write(b)
}

// watchREST streams the GameServer, one {"result": ...} line per change.
func (s *agonesServer) watchREST(w http.ResponseWriter, r *http.Request) {
	flusher, _ := w.(http.Flusher)
	started := false
	ctx, cancel := rest.UntilStop(r.Context()) // a watch ends when the gateway stops
	defer cancel()
	err := s.watch(ctx, func(gs *agonespb.GameServer) error {
		b, err := agonesMarshal.Marshal(gs)
		if err != nil {
			return status.Error(codes.Internal, err.Error())
		}
		if !started {
			w.Header().Set("Content-Type", "application/json")
			w.WriteHeader(http.StatusOK)
			started = true
		}
		line := make([]byte, 0, len(b)+12)
		line = append(append(append(line, `{"result":`...), b...), "}\n"...)
		if _, err := w.Write(line); err != nil {
			return err
		}
		if flusher != nil {
			flusher.Flush()
		}
		return nil
	})
	if err == nil || ctx.Err() != nil {
		return
	}
	if !started {
		writeAgonesError(w, err)
		return
	}
	if st, ok := status.FromError(err); ok {
		b, _ := agonesMarshal.Marshal(st.Proto())
		_, _ = w.Write(append(append([]byte(`{"error":`), b...), "}\n"...))
	}
}

// agonesHTTPStatus is the gateway's HTTP status of a gRPC code.
func agonesHTTPStatus(c codes.Code) int {
	switch c {
	case codes.OK:
		return http.StatusOK
	case codes.Canceled:
		return 499
	case codes.InvalidArgument, codes.FailedPrecondition, codes.OutOfRange:
		return http.StatusBadRequest
	case codes.DeadlineExceeded:
		return http.StatusGatewayTimeout
	case codes.NotFound:
		return http.StatusNotFound
	case codes.AlreadyExists, codes.Aborted:
		return http.StatusConflict
	case codes.PermissionDenied:
		return http.StatusForbidden
	case codes.Unauthenticated:
		return http.StatusUnauthorized
	case codes.ResourceExhausted:
		return http.StatusTooManyRequests
	case codes.Unimplemented:
		return http.StatusNotImplemented
	case codes.Unavailable:
		return http.StatusServiceUnavailable
	}
	return http.StatusInternalServerError
}

// writeAgonesError writes err as the gateway's error body.
func writeAgonesError(w http.ResponseWriter, err error) {
	st, ok := status.FromError(err)
	if !ok {
		st = status.New(codes.Unknown, err.Error())
	}
	b, merr := agonesMarshal.Marshal(st.Proto())
	if merr != nil {
		b = []byte(`{"code":2,"message":"internal error","details":[]}`)
	}
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(agonesHTTPStatus(st.Code()))
	_, _ = w.Write(b)
}
