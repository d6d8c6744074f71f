package lspm

// The gRPC side of the Agones SDK: the services agones.dev.sdk.SDK and
// agones.dev.sdk.alpha.SDK (player tracking) on AGONES_SDK_GRPC_PORT, as
// the official Agones SDKs call them. The beta service (counters and lists)
// and anything else is answered Unimplemented, naming the call.

import (
	"context"
	"errors"
	"io"
	"net"
	"strings"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"

	"dedi.dev/dedi/internal/agonespb"
	"dedi.dev/dedi/internal/agonespb/alpha"
)

var (
	_ agonespb.SDKServer = (*grpcSDK)(nil)
	_ alpha.SDKServer    = (*grpcAlpha)(nil)
)

// grpcServer builds the process's gRPC server.
func (s *agonesServer) grpcServer() *grpc.Server {
	gs := grpc.NewServer(
		grpc.Creds(peerCreds{check: s.owner.checkPeer}),
		grpc.MaxConcurrentStreams(64),
		grpc.WaitForHandlers(true), // Stop returns once every handler has: the agent's Close waits for them
		grpc.UnaryInterceptor(func(ctx context.Context, req any, info *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
			if err := s.allowed(ctx); err != nil {
				return nil, err
			}
			return h(ctx, req)
		}),
		grpc.StreamInterceptor(func(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, h grpc.StreamHandler) error {
			if err := s.allowed(ss.Context()); err != nil {
				return err
			}
			return h(srv, ss)
		}),
		grpc.UnknownServiceHandler(func(srv any, ss grpc.ServerStream) error {
			if err := s.allowed(ss.Context()); err != nil {
				return err
			}
			method, _ := grpc.MethodFromServerStream(ss)
			return status.Error(codes.Unimplemented, unimplementedCall(strings.TrimPrefix(method, "/")))
		}),
	)
	agonespb.RegisterSDKServer(gs, &grpcSDK{s: s})
	alpha.RegisterSDKServer(gs, &grpcAlpha{s: s})
	return gs
}

// unimplementedCall says what dedi does not do, for a full method name
// such as "agones.dev.sdk.beta.SDK/GetCounter".
func unimplementedCall(method string) string {
	if strings.HasPrefix(method, "agones.dev.sdk.beta.SDK/") {
		return method + " is not implemented by dedi: Agones counters and lists are not supported (docs/AGONES.md)"
	}
	return method + " is not implemented by dedi (docs/AGONES.md)"
}

// allowed checks the connection's peer verdict made at the handshake.
func (s *agonesServer) allowed(ctx context.Context) error {
	p, ok := peer.FromContext(ctx)
	if !ok {
		return status.Error(codes.PermissionDenied, "no peer")
	}
	auth, ok := p.AuthInfo.(peerAuth)
	if !ok {
		return status.Error(codes.PermissionDenied, "no peer check")
	}
	if auth.err != nil {
		return status.Errorf(codes.PermissionDenied, "process %s: %v", s.id, auth.err)
	}
	return nil
}

// peerCreds is a plain-text transport that checks, once per connection,
// that the client belongs to the game's process tree. The verdict rides in
// the AuthInfo so that every call can be refused with a clear status.
type peerCreds struct {
	check func(net.Conn) error
}

type peerAuth struct {
	credentials.CommonAuthInfo
	err error
}

func (peerAuth) AuthType() string { return "dedi-peer" }

func (c peerCreds) ServerHandshake(conn net.Conn) (net.Conn, credentials.AuthInfo, error) {
	return conn, peerAuth{CommonAuthInfo: credentials.CommonAuthInfo{SecurityLevel: credentials.NoSecurity}, err: c.check(conn)}, nil
}

func (c peerCreds) ClientHandshake(context.Context, string, net.Conn) (net.Conn, credentials.AuthInfo, error) {
	return nil, nil, errors.New("peerCreds is for servers only")
}

func (c peerCreds) Info() credentials.ProtocolInfo {
	return credentials.ProtocolInfo{SecurityProtocol: "insecure"}
}

func (c peerCreds) Clone() credentials.TransportCredentials { return c }

// OverrideServerName is part of the (client side of the) interface.
func (c peerCreds) OverrideServerName(string) error { return nil }

// grpcSDK is agones.dev.sdk.SDK.
type grpcSDK struct {
	agonespb.UnimplementedSDKServer
	s *agonesServer
}

var empty = &agonespb.Empty{}

func (g *grpcSDK) Ready(context.Context, *agonespb.Empty) (*agonespb.Empty, error) {
	return empty, g.s.Ready()
}

func (g *grpcSDK) Allocate(context.Context, *agonespb.Empty) (*agonespb.Empty, error) {
	return empty, g.s.Allocate()
}

func (g *grpcSDK) Shutdown(context.Context, *agonespb.Empty) (*agonespb.Empty, error) {
	return empty, g.s.Shutdown()
}

// Health takes a stream of pings, each a heartbeat, until the client
// closes it.
func (g *grpcSDK) Health(stream grpc.ClientStreamingServer[agonespb.Empty, agonespb.Empty]) error {
	for {
		if _, err := stream.Recv(); err != nil {
			if errors.Is(err, io.EOF) {
				return stream.SendAndClose(empty)
			}
			return err
		}
		if err := g.s.Health(); err != nil {
			return err
		}
	}
}

func (g *grpcSDK) GetGameServer(context.Context, *agonespb.Empty) (*agonespb.GameServer, error) {
	gs, _, err := g.s.GameServer()
	return gs, err
}

func (g *grpcSDK) WatchGameServer(_ *agonespb.Empty, stream grpc.ServerStreamingServer[agonespb.GameServer]) error {
	return g.s.watch(stream.Context(), stream.Send)
}

func (g *grpcSDK) SetLabel(_ context.Context, kv *agonespb.KeyValue) (*agonespb.Empty, error) {
	return empty, g.s.SetLabel(kv.GetKey(), kv.GetValue())
}

func (g *grpcSDK) SetAnnotation(_ context.Context, kv *agonespb.KeyValue) (*agonespb.Empty, error) {
	return empty, g.s.SetAnnotation(kv.GetKey(), kv.GetValue())
}

func (g *grpcSDK) Reserve(_ context.Context, d *agonespb.Duration) (*agonespb.Empty, error) {
	return empty, g.s.Reserve(d.GetSeconds())
}

// grpcAlpha is agones.dev.sdk.alpha.SDK: player tracking.
type grpcAlpha struct {
	alpha.UnimplementedSDKServer
	s *agonesServer
}

func (g *grpcAlpha) PlayerConnect(_ context.Context, id *alpha.PlayerID) (*alpha.Bool, error) {
	ok, err := g.s.PlayerConnect(id.GetPlayerID())
	if err != nil {
		return nil, err
	}
	return &alpha.Bool{Bool: ok}, nil
}

func (g *grpcAlpha) PlayerDisconnect(_ context.Context, id *alpha.PlayerID) (*alpha.Bool, error) {
	ok, err := g.s.PlayerDisconnect(id.GetPlayerID())
	if err != nil {
		return nil, err
	}
	return &alpha.Bool{Bool: ok}, nil
}

func (g *grpcAlpha) SetPlayerCapacity(_ context.Context, c *alpha.Count) (*alpha.Empty, error) {
	return &alpha.Empty{}, g.s.SetPlayerCapacity(c.GetCount())
}

func (g *grpcAlpha) GetPlayerCapacity(context.Context, *alpha.Empty) (*alpha.Count, error) {
	_, c, err := g.s.players()
	if err != nil {
		return nil, err
	}
	return &alpha.Count{Count: c}, nil
}

func (g *grpcAlpha) GetPlayerCount(context.Context, *alpha.Empty) (*alpha.Count, error) {
	ids, _, err := g.s.players()
	if err != nil {
		return nil, err
	}
	return &alpha.Count{Count: int64(len(ids))}, nil
}

func (g *grpcAlpha) IsPlayerConnected(_ context.Context, id *alpha.PlayerID) (*alpha.Bool, error) {
	ids, _, err := g.s.players()
	if err != nil {
		return nil, err
	}
	for _, p := range ids {
		if p == id.GetPlayerID() {
			return &alpha.Bool{Bool: true}, nil
		}
	}
	return &alpha.Bool{Bool: false}, nil
}

func (g *grpcAlpha) GetConnectedPlayers(context.Context, *alpha.Empty) (*alpha.PlayerIDList, error) {
	ids, _, err := g.s.players()
	if err != nil {
		return nil, err
	}
	return &alpha.PlayerIDList{List: ids}, nil
}
