// Package store keeps the VMM's state in SQLite (modernc.org/sqlite, WAL):
// fleets, machines, processes and events, each row a JSON body with the few
// columns queries need. The VMM holds its state in memory and writes
// through; a committed Apply survives a kill -9 of the VMM.
package store

import (
	"database/sql"
	"errors"
	"fmt"

	_ "modernc.org/sqlite" // the database/sql driver "sqlite"
)

// Tables a row can go to.
const (
	Fleets    = "fleets"
	Machines  = "machines"
	Processes = "processes"
	Events    = "events"
	Meta      = "meta"
)

// Op is one write: an upsert of Body under Key, or a delete.
type Op struct {
	Table  string
	Key    string // for Events: ignored (Seq is the key)
	Seq    int64  // Events only
	Body   []byte
	Delete bool
	// Columns that queries and pruning use (processes, machines).
	Fleet, Machine, State string
	Ended                 bool
	Order                 int64 // processes: insertion order, for pruning the oldest
}

// Row is a stored row.
type Row struct {
	Key  string
	Body []byte
}

// Snapshot is everything but events, as loaded at start.
type Snapshot struct {
	Fleets, Machines, Processes []Row
	Meta                        map[string]string
	LastEventSeq                int64
	LastProcessOrder            int64
}

// Store is the VMM's database.
type Store struct {
	db    *sql.DB
	stmts map[string]*sql.Stmt // the writes, prepared once: SQLite's parser was a tenth of a busy VMM's CPU
}

// writes are the statements apply uses, by name.
var writes = map[string]string{
	"fleets.delete":   `DELETE FROM fleets WHERE key = ?`,
	"fleets.upsert":   `INSERT INTO fleets (key, body) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET body = excluded.body`,
	"machines.delete": `DELETE FROM machines WHERE key = ?`,
	"machines.upsert": `INSERT INTO machines (key, fleet, state, body) VALUES (?, ?, ?, ?)
		ON CONFLICT(key) DO UPDATE SET fleet = excluded.fleet, state = excluded.state, body = excluded.body`,
	"processes.delete": `DELETE FROM processes WHERE key = ?`,
	"processes.upsert": `INSERT INTO processes (key, fleet, machine, state, ended, rowid_order, body)
		VALUES (?, ?, ?, ?, ?, ?, ?)
		ON CONFLICT(key) DO UPDATE SET fleet = excluded.fleet, machine = excluded.machine,
		state = excluded.state, ended = excluded.ended, body = excluded.body`,
	"events.insert": `INSERT INTO events (seq, body) VALUES (?, ?)`,
	"meta.delete":   `DELETE FROM meta WHERE key = ?`,
	"meta.upsert":   `INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value`,
}

const schema = `
CREATE TABLE IF NOT EXISTS fleets (key TEXT PRIMARY KEY, body BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS machines (key TEXT PRIMARY KEY, fleet TEXT NOT NULL, state TEXT NOT NULL, body BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS processes (key TEXT PRIMARY KEY, fleet TEXT NOT NULL, machine TEXT NOT NULL,
  state TEXT NOT NULL, ended INTEGER NOT NULL, rowid_order INTEGER, body BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS processes_ended ON processes (ended, rowid_order);
CREATE TABLE IF NOT EXISTS events (seq INTEGER PRIMARY KEY, body BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
`

// Open opens (creating) the database at path.
func Open(path string) (*Store, error) {
	dsn := "file:" + path + "?_pragma=journal_mode(WAL)&_pragma=synchronous(NORMAL)&_pragma=busy_timeout(5000)&_pragma=foreign_keys(ON)"
	db, err := sql.Open("sqlite", dsn)
	if err != nil {
		return nil, fmt.Errorf("open store %s: %w", path, err)
	}
	// One connection: SQLite serialises writers anyway, and the VMM has a
	// single writer goroutine.
	db.SetMaxOpenConns(1)
	if _, err := db.Exec(schema); err != nil {
		db.Close()
		return nil, fmt.Errorf("store schema: %w", err)
	}
	st := &Store{db: db, stmts: map[string]*sql.Stmt{}}
	for name, q := range writes {
		stmt, err := db.Prepare(q)
		if err != nil {
			db.Close()
			return nil, fmt.Errorf("store: prepare %s: %w", name, err)
		}
		st.stmts[name] = stmt
	}
	return st, nil
}

// Close closes the database.
func (s *Store) Close() error {
	for _, stmt := range s.stmts {
		stmt.Close()
	}
	return s.db.Close()
}

// Apply writes ops in one transaction: all or nothing.
func (s *Store) Apply(ops []Op) error {
	if len(ops) == 0 {
		return nil
	}
	tx, err := s.db.Begin()
	if err != nil {
		return fmt.Errorf("store: begin: %w", err)
	}
	defer tx.Rollback() //nolint:errcheck // after Commit it is a no-op
	// A statement prepared on the store's one connection is reused by
	// the transaction, not prepared again.
	stmt := func(name string) *sql.Stmt { return tx.Stmt(s.stmts[name]) }
	for _, op := range ops {
		if err := apply(stmt, op); err != nil {
			return fmt.Errorf("store: %s %s: %w", op.Table, op.Key, err)
		}
	}
	if err := tx.Commit(); err != nil {
		return fmt.Errorf("store: commit: %w", err)
	}
	return nil
}

func apply(stmt func(name string) *sql.Stmt, op Op) error {
	var err error
	switch op.Table {
	case Fleets:
		if op.Delete {
			_, err = stmt("fleets.delete").Exec(op.Key)
		} else {
			_, err = stmt("fleets.upsert").Exec(op.Key, op.Body)
		}
	case Machines:
		if op.Delete {
			_, err = stmt("machines.delete").Exec(op.Key)
		} else {
			_, err = stmt("machines.upsert").Exec(op.Key, op.Fleet, op.State, op.Body)
		}
	case Processes:
		if op.Delete {
			_, err = stmt("processes.delete").Exec(op.Key)
		} else {
			_, err = stmt("processes.upsert").Exec(op.Key, op.Fleet, op.Machine, op.State, op.Ended, op.Order, op.Body)
		}
	case Events:
		_, err = stmt("events.insert").Exec(op.Seq, op.Body)
	case Meta:
		if op.Delete {
			_, err = stmt("meta.delete").Exec(op.Key)
		} else {
			_, err = stmt("meta.upsert").Exec(op.Key, string(op.Body))
		}
	default:
		err = errors.New("unknown table")
	}
	return err
}

// Load reads everything but the events.
func (s *Store) Load() (Snapshot, error) {
	snap := Snapshot{Meta: map[string]string{}}
	var err error
	if snap.Fleets, err = s.rows(`SELECT key, body FROM fleets ORDER BY key`); err != nil {
		return snap, err
	}
	if snap.Machines, err = s.rows(`SELECT key, body FROM machines ORDER BY key`); err != nil {
		return snap, err
	}
	if snap.Processes, err = s.rows(`SELECT key, body FROM processes ORDER BY rowid_order`); err != nil {
		return snap, err
	}
	meta, err := s.rows(`SELECT key, value FROM meta`)
	if err != nil {
		return snap, err
	}
	for _, r := range meta {
		snap.Meta[r.Key] = string(r.Body)
	}
	if err := s.db.QueryRow(`SELECT COALESCE(MAX(seq), 0) FROM events`).Scan(&snap.LastEventSeq); err != nil {
		return snap, fmt.Errorf("store: events: %w", err)
	}
	if err := s.db.QueryRow(`SELECT COALESCE(MAX(rowid_order), 0) FROM processes`).Scan(&snap.LastProcessOrder); err != nil {
		return snap, fmt.Errorf("store: processes: %w", err)
	}
	return snap, nil
}

func (s *Store) rows(q string, args ...any) ([]Row, error) {
	rows, err := s.db.Query(q, args...)
	if err != nil {
		return nil, fmt.Errorf("store: %w", err)
	}
	defer rows.Close()
	var out []Row
	for rows.Next() {
		var r Row
		if err := rows.Scan(&r.Key, &r.Body); err != nil {
			return nil, fmt.Errorf("store: %w", err)
		}
		out = append(out, r)
	}
	return out, rows.Err()
}

// Events returns up to limit event bodies with seq above after, in order.
func (s *Store) Events(after int64, limit int) ([]Row, error) {
	return s.rows(`SELECT CAST(seq AS TEXT), body FROM events WHERE seq > ? ORDER BY seq LIMIT ?`, after, limit)
}

// Prune deletes at most limit of the events beyond the newest keepEvents,
// and at most limit of the ended processes beyond the newest keepEnded; it
// reports whether more are left. Bounded, because every write of the VMM
// waits while it runs: one delete of 290,000 events took 0.7 s on an idle
// machine.
func (s *Store) Prune(keepEvents, keepEnded, limit int) (more bool, err error) {
	res, err := s.db.Exec(`DELETE FROM events WHERE seq IN (SELECT seq FROM events
		WHERE seq <= (SELECT COALESCE(MAX(seq), 0) FROM events) - ? ORDER BY seq LIMIT ?)`, keepEvents, limit)
	if err != nil {
		return false, fmt.Errorf("store: prune events: %w", err)
	}
	n, _ := res.RowsAffected()
	more = n == int64(limit)
	res, err = s.db.Exec(`DELETE FROM processes WHERE key IN (SELECT key FROM processes WHERE ended = 1
		ORDER BY rowid_order DESC LIMIT ? OFFSET ?)`, limit, keepEnded)
	if err != nil {
		return false, fmt.Errorf("store: prune processes: %w", err)
	}
	n, _ = res.RowsAffected()
	return more || n == int64(limit), nil
}
