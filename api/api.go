// Package api holds the wire types of dedi's REST contract (shared/API.md):
// the JSON objects that the LSPM, the VMM, the SDKs and the CLI exchange.
// It has no dependencies beyond the standard library so that game servers
// and tools can import it cheaply.
package api

import "time"

// Process states (DESIGN.md): starting -> ready -> allocated, then one of the
// terminal states.
const (
	StateStarting  = "starting"
	StateReady     = "ready"
	StateAllocated = "allocated"
	StateExited    = "exited"
	StateCrashed   = "crashed"
	StateUnhealthy = "unhealthy"
	StateKilled    = "killed"
	StateLost      = "lost"
)

// Exit reasons carried in Exit.Reason.
const (
	ReasonExited      = "exited"
	ReasonCrashed     = "crashed"
	ReasonUnhealthy   = "unhealthy"
	ReasonKilled      = "killed"
	ReasonMemoryLimit = "memory_limit"
	ReasonLost        = "lost"
)

// LSPM machine load states reported in Status.State.
const (
	LoadEmpty        = "empty"
	LoadPartial      = "partial"
	LoadFull         = "full"
	LoadShuttingDown = "shutting_down"
)

// SDK kinds a process may ask for.
const (
	SDKDedi   = "dedi"
	SDKAgones = "agones"
)

// Problem codes that are part of the contract.
const (
	CodeInvalid              = "invalid"
	CodeNotFound             = "not_found"
	CodeUnauthorized         = "unauthorized"
	CodeForbidden            = "forbidden"
	CodeFull                 = "full"
	CodeShuttingDown         = "shutting_down"
	CodeBusy                 = "busy"
	CodeExecutableNotAllowed = "executable_not_allowed"
	CodeTooLarge             = "too_large"
	CodeExists               = "exists"
	CodeNoCapacity           = "no_capacity"
	CodeTimeout              = "timeout"
	CodeInternal             = "internal"
	CodeUnsupportedMedia     = "unsupported_media_type"
	CodeMethodNotAllowed     = "method_not_allowed"
)

// IsTerminal reports whether a process state is final.
func IsTerminal(state string) bool {
	switch state {
	case StateExited, StateCrashed, StateUnhealthy, StateKilled, StateLost:
		return true
	}
	return false
}

// Problem is an RFC 9457 problem document, the body of every error answer.
type Problem struct {
	Type   string `json:"type"`
	Title  string `json:"title"`
	Status int    `json:"status"`
	Detail string `json:"detail,omitempty"`
	Code   string `json:"code"`
}

// Error makes a Problem usable as a Go error on the client side.
func (p *Problem) Error() string {
	if p.Detail != "" {
		return p.Code + ": " + p.Detail
	}
	return p.Code + ": " + p.Title
}

// Health holds the heartbeat settings of a process. Zero fields take the
// LSPM's defaults.
type Health struct {
	PeriodSeconds       float64 `json:"periodSeconds,omitempty"`
	FailureThreshold    int     `json:"failureThreshold,omitempty"`
	StartTimeoutSeconds float64 `json:"startTimeoutSeconds,omitempty"`
}

// SpawnRequest is the body of the LSPM's POST /v1/processes.
type SpawnRequest struct {
	ID      string            `json:"id,omitempty"`
	Fleet   string            `json:"fleet,omitempty"`
	Command []string          `json:"command,omitempty"`
	Params  map[string]any    `json:"params,omitempty"`
	Env     map[string]string `json:"env,omitempty"`
	Labels  map[string]string `json:"labels,omitempty"`
	// Ports names the ports to allocate; nil means ["game"], an empty list none.
	Ports  []string `json:"ports"`
	Health *Health  `json:"health,omitempty"`
	SDK    string   `json:"sdk,omitempty"`
	// MemoryLimitBytes kills the process (reason memory_limit) when its RSS
	// passes it; 0 takes the LSPM's default, negative means no limit.
	MemoryLimitBytes int64 `json:"memoryLimitBytes,omitempty"`
}

// Exit is the evidence of an ended process.
type Exit struct {
	Code    *int     `json:"code"`
	Signal  string   `json:"signal,omitempty"`
	Reason  string   `json:"reason"`
	Detail  string   `json:"detail,omitempty"`
	LogTail []string `json:"logTail"`
}

// Process is the process object of API.md.
type Process struct {
	ID               string            `json:"id"`
	Fleet            string            `json:"fleet,omitempty"`
	MachineID        string            `json:"machineId"`
	State            string            `json:"state"`
	PID              int               `json:"pid"`
	Command          []string          `json:"command"`
	Params           map[string]any    `json:"params"`
	Labels           map[string]string `json:"labels"`
	Annotations      map[string]string `json:"annotations,omitempty"` // set through the Agones SDK
	Address          string            `json:"address"`
	Ports            map[string]int    `json:"ports"`
	Players          int               `json:"players"`
	Instances        int               `json:"instances,omitempty"`
	SDK              string            `json:"sdk,omitempty"`
	Health           Health            `json:"health"`
	MemoryLimitBytes int64             `json:"memoryLimitBytes,omitempty"`
	RSSBytes         int64             `json:"rssBytes,omitempty"`
	CreatedAt        time.Time         `json:"createdAt"`
	ReadyAt          *time.Time        `json:"readyAt"`
	LastHeartbeatAt  *time.Time        `json:"lastHeartbeatAt"`
	EndedAt          *time.Time        `json:"endedAt"`
	Exit             *Exit             `json:"exit"`
}

// Heartbeat is the optional body of POST /v1/processes/{id}/heartbeat.
type Heartbeat struct {
	Players   *int `json:"players,omitempty"`
	Instances *int `json:"instances,omitempty"`
}

// Hardware is the fingerprint of the machine an LSPM runs on.
type Hardware struct {
	CPUModel    string `json:"cpuModel"`
	CPUs        int    `json:"cpus"`
	MemoryBytes int64  `json:"memoryBytes"`
	Kernel      string `json:"kernel"`
	Hostname    string `json:"hostname"`
}

// Status is the LSPM's GET /v1/status answer and the body of its status
// reports to the VMM.
type Status struct {
	MachineID    string     `json:"machineId"`
	State        string     `json:"state"`
	Seq          uint64     `json:"seq"`
	MaxProcesses int        `json:"maxProcesses"`
	Processes    []Process  `json:"processes"`
	Ended        []Process  `json:"ended,omitempty"`
	Hardware     Hardware   `json:"hardware"`
	StartedAt    time.Time  `json:"startedAt"`
	ShutdownAt   *time.Time `json:"shutdownAt,omitempty"`
	At           time.Time  `json:"at"`
}

// List is the envelope of every list answer.
type List[T any] struct {
	Items []T `json:"items"`
}

// ShutdownAnswer is the 200 body of the handshake.
type ShutdownAnswer struct {
	Accepted bool `json:"accepted"`
}

// ReportAnswer is the VMM's answer to a status report.
type ReportAnswer struct {
	Applied bool `json:"applied"`
}

// Environment variables a game server process receives.
const (
	EnvProcessID    = "DEDI_PROCESS_ID"
	EnvProcessToken = "DEDI_PROCESS_TOKEN"
	EnvSDKURL       = "DEDI_SDK_URL"
	EnvParams       = "DEDI_PARAMS"
	EnvMachineID    = "DEDI_MACHINE_ID"
	EnvFleet        = "DEDI_FLEET"
	EnvPortPrefix   = "DEDI_PORT_"
	EnvHeartbeatMS  = "DEDI_HEARTBEAT_MS"
	EnvMachineToken = "DEDI_MACHINE_TOKEN"
	EnvAdminToken   = "DEDI_TOKEN"
	EnvAddr         = "DEDI_ADDR"
)

// Fleet is a set of machines running one game server build (API.md, VMM).
type Fleet struct {
	Name                string   `json:"name"`
	Provider            string   `json:"provider"`
	Image               string   `json:"image"`
	Command             []string `json:"command"`
	ProcessesPerMachine int      `json:"processesPerMachine"`
	Ports               []string `json:"ports"`
	Health              Health   `json:"health"`
	Scaling             Scaling  `json:"scaling"`
	Placement           string   `json:"placement"`
	SDK                 string   `json:"sdk"`
	// State is "active", or "deleting" while its machines drain.
	State     string    `json:"state,omitempty"`
	CreatedAt time.Time `json:"createdAt"`
}

// Scaling bounds a fleet's machines.
type Scaling struct {
	MinMachines         int     `json:"minMachines"`
	MaxMachines         int     `json:"maxMachines"`
	IdleShutdownSeconds float64 `json:"idleShutdownSeconds"`
}

// Placement policies.
const (
	PlacementPacked      = "packed"
	PlacementDistributed = "distributed"
)

// Machine states as the VMM sees them.
const (
	MachineProvisioning = "provisioning"
	MachineBooting      = "booting"
	MachineReady        = "ready"
	MachineDraining     = "draining"
	MachineShuttingDown = "shutting_down"
	MachineTerminated   = "terminated"
	MachineLost         = "lost"
)

// Machine is the VMM's view of one machine.
type Machine struct {
	ID           string     `json:"id"`
	Fleet        string     `json:"fleet"`
	Provider     string     `json:"provider"`
	ProviderID   string     `json:"providerId"`
	State        string     `json:"state"`
	Load         string     `json:"load"`
	Address      string     `json:"address"`
	ProcessCount int        `json:"processCount"`
	MaxProcesses int        `json:"maxProcesses"`
	LastReportAt *time.Time `json:"lastReportAt"`
	Seq          uint64     `json:"seq"`
	Hardware     *Hardware  `json:"hardware"`
	CreatedAt    time.Time  `json:"createdAt"`
}

// StartRequest is the body of the VMM's POST /v1/processes.
type StartRequest struct {
	Fleet  string            `json:"fleet"`
	Params map[string]any    `json:"params,omitempty"`
	Labels map[string]string `json:"labels,omitempty"`
}

// CreateMachineRequest is the body of POST /v1/machines.
type CreateMachineRequest struct {
	Fleet string `json:"fleet"`
}

// Event is one Server-Sent Event of GET /v1/events.
type Event struct {
	Seq       int64     `json:"seq"`
	Type      string    `json:"type"`
	At        time.Time `json:"at"`
	Fleet     string    `json:"fleet,omitempty"`
	MachineID string    `json:"machineId,omitempty"`
	ProcessID string    `json:"processId,omitempty"`
	State     string    `json:"state,omitempty"`
	Detail    string    `json:"detail,omitempty"`
}
