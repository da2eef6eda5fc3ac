package pgbroker

import (
	"context"
	"encoding/json"
	"fmt"
	"slices"
	"strings"
	"sync"

	"github.com/roomcast/pubsub"
)

// member is one of this node's presence entries. Its mu is held while a
// call about it runs, so a refresh never adds back an entry that is
// leaving.
type member struct {
	mu     sync.Mutex
	room   string
	m      pubsub.Member
	events bool
	left   bool
}

// memberKey makes a user one member whatever its number of connections,
// and an anonymous connection a member of its own.
func memberKey(m pubsub.Member) string {
	if m.UserID != "" {
		return "u:" + m.UserID
	}
	return "c:" + m.ConnID
}

func infoBytes(m pubsub.Member) []byte {
	if len(m.Info) == 0 {
		return nil
	}
	return m.Info
}

// Join adds m to the room's presence, announcing a member's first
// connection when events is set. Join, leave and the room's messages are
// one stream: every node delivers them in the order they committed.
func (b *Broker) Join(ctx context.Context, room string, m pubsub.Member, events bool) error {
	if len(room) > MaxRoomNameBytes {
		return ErrRoomName
	}
	mm := &member{room: room, m: m, events: events}
	mm.mu.Lock()
	defer mm.mu.Unlock()
	b.mu.Lock()
	if b.closed {
		b.mu.Unlock()
		return pubsub.ErrClosed
	}
	conns := b.members[room]
	if conns == nil {
		conns = make(map[string]*member)
		b.members[room] = conns
	}
	conns[m.ConnID] = mm
	b.mu.Unlock()
	if err := b.join(ctx, mm); err != nil {
		b.forget(mm)
		return fmt.Errorf("pgbroker: join room %q: %w", room, err)
	}
	return nil
}

func (b *Broker) join(ctx context.Context, mm *member) error {
	_, err := b.pool.Exec(ctx, b.sql.join, mm.room, mm.m.ConnID, memberKey(mm.m), mm.m.UserID, infoBytes(mm.m),
		mm.events, b.node, us(b.cfg.presenceTTL))
	return err
}

// forget drops one of this node's presence entries from its refresh list.
func (b *Broker) forget(mm *member) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if conns := b.members[mm.room]; conns[mm.m.ConnID] == mm {
		delete(conns, mm.m.ConnID)
		if len(conns) == 0 {
			delete(b.members, mm.room)
		}
	}
}

// Leave removes m from the room's presence, announcing a member's last
// connection when events is set.
func (b *Broker) Leave(ctx context.Context, room string, m pubsub.Member, events bool) error {
	b.mu.Lock()
	if b.closed {
		b.mu.Unlock()
		return pubsub.ErrClosed
	}
	mm := b.members[room][m.ConnID]
	b.mu.Unlock()
	if mm != nil {
		b.forget(mm)
		mm.mu.Lock()
		mm.left = true
		defer mm.mu.Unlock()
	}
	if _, err := b.pool.Exec(ctx, b.sql.leave, room, m.ConnID, events); err != nil {
		return fmt.Errorf("pgbroker: leave room %q: %w", room, err)
	}
	return nil
}

// Presence lists the room's live members on every node. Entries whose node
// stopped refreshing them are left out, and deleted (with leave events).
func (b *Broker) Presence(ctx context.Context, room string, countsOnly bool) (pubsub.Presence, error) {
	if b.isClosed() {
		return pubsub.Presence{}, pubsub.ErrClosed
	}
	if countsOnly {
		var members, conns int64
		if err := b.pool.QueryRow(ctx, b.sql.presenceCounts, room).Scan(&members, &conns); err != nil {
			return pubsub.Presence{}, fmt.Errorf("pgbroker: presence of room %q: %w", room, err)
		}
		return pubsub.Presence{Count: int(members), Connections: int(conns)}, nil
	}
	rows, err := b.pool.Query(ctx, b.sql.presence, room)
	if err != nil {
		return pubsub.Presence{}, fmt.Errorf("pgbroker: presence of room %q: %w", room, err)
	}
	defer rows.Close()
	type group struct {
		pm    pubsub.PresenceMember
		first string
		info  json.RawMessage
	}
	groups := make(map[string]*group)
	conns := 0
	for rows.Next() {
		var (
			conn, user string
			info       []byte
		)
		if err := rows.Scan(&conn, &user, &info); err != nil {
			return pubsub.Presence{}, fmt.Errorf("pgbroker: presence of room %q: %w", room, err)
		}
		conns++
		k := memberKey(pubsub.Member{ConnID: conn, UserID: user})
		g := groups[k]
		if g == nil {
			g = &group{pm: pubsub.PresenceMember{UserID: user}, first: conn}
			if len(info) > 0 {
				g.info = info
			}
			groups[k] = g
		} else if conn < g.first {
			g.first, g.info = conn, nil
			if len(info) > 0 {
				g.info = info
			}
		}
		g.pm.Conns = append(g.pm.Conns, conn)
	}
	if err := rows.Err(); err != nil {
		return pubsub.Presence{}, fmt.Errorf("pgbroker: presence of room %q: %w", room, err)
	}
	p := pubsub.Presence{Count: len(groups), Connections: conns, Members: make([]pubsub.PresenceMember, 0, len(groups))}
	for _, g := range groups {
		slices.Sort(g.pm.Conns)
		g.pm.Info = g.info
		p.Members = append(p.Members, g.pm)
	}
	slices.SortFunc(p.Members, func(a, c pubsub.PresenceMember) int {
		if a.UserID != c.UserID {
			return strings.Compare(a.UserID, c.UserID)
		}
		return strings.Compare(a.Conns[0], c.Conns[0])
	})
	return p, nil
}

// refreshBatch bounds the entries one refresh statement covers.
const refreshBatch = 1000

// refresh extends this node's presence entries, and adds back (announcing
// them again) those that vanished: expired by another node's sweep while
// this one could not reach the database.
func (b *Broker) refresh(ctx context.Context) error {
	b.mu.Lock()
	var all []*member
	for _, conns := range b.members {
		for _, mm := range conns {
			all = append(all, mm)
		}
	}
	b.mu.Unlock()
	var first error
	for len(all) > 0 {
		n := min(len(all), refreshBatch)
		if err := b.refreshBatch(ctx, all[:n]); err != nil && first == nil {
			first = err
		}
		all = all[n:]
	}
	return first
}

func (b *Broker) refreshBatch(ctx context.Context, batch []*member) error {
	var locked []*member
	defer func() {
		for _, mm := range locked {
			mm.mu.Unlock()
		}
	}()
	var rooms, conns []string
	for _, mm := range batch {
		// A member joining or leaving right now is its own call's job.
		if !mm.mu.TryLock() {
			continue
		}
		if mm.left {
			mm.mu.Unlock()
			continue
		}
		locked = append(locked, mm)
		rooms = append(rooms, mm.room)
		conns = append(conns, mm.m.ConnID)
	}
	if len(locked) == 0 {
		return nil
	}
	rows, err := b.pool.Query(ctx, b.sql.refresh, rooms, conns, us(b.cfg.presenceTTL))
	if err != nil {
		return err
	}
	type entry struct{ room, conn string }
	found := make(map[entry]bool, len(locked))
	for rows.Next() {
		var e entry
		if err := rows.Scan(&e.room, &e.conn); err != nil {
			rows.Close()
			return err
		}
		found[e] = true
	}
	if err := rows.Err(); err != nil {
		return err
	}
	for _, mm := range locked {
		if !found[entry{mm.room, mm.m.ConnID}] {
			if err := b.join(ctx, mm); err != nil {
				return err
			}
		}
	}
	return nil
}
