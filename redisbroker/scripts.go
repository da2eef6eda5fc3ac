package redisbroker

import "github.com/redis/go-redis/v9"

// The Lua scripts that make each room operation atomic. All keys of one
// room share the hash tag {room}, so every script touches one cluster slot.
//
// A room's keys (prefix P, room R):
//
//	P:{R}:m  hash: e = epoch, s = last seq, h = history TTL (ms) and n =
//	         history size of the last publish, x = when (ms) a publish
//	         must next extend the expiries of the room's keys
//	         (publishScript). Its expiry ends the room's life: a missing
//	         meta key means a new epoch (expired, evicted, or lost in a
//	         restart).
//	P:{R}:h  stream: the history; entry id 0-<seq>, fields i (message id),
//	         t (time, µs), d (payload). Trimmed roughly by count on
//	         publish (XADD MAXLEN ~: whole nodes of the stream, so it
//	         holds at most a node's worth of entries more), exactly by
//	         count and age on read, and expired as a whole with the TTL.
//	P:{R}:p  sorted set: conn id -> when its presence entry expires (ms).
//	P:{R}:c  hash: conn id -> events flag, member key and member record.
//	P:{R}:u  hash: member key (u:<user> or c:<conn>) -> its connections.
//	P:{R}    the room's pub/sub channel.
//	P:{R}:k:K  string: "epoch seq id time" of the message that idempotency
//	         key K sequenced; it expires with the key's TTL.
//	P:l:L    string: the result of the last batch that publish lane L
//	         ran, which starts with the batch's id (see publish.go), to
//	         answer a resent batch instead of sequencing it twice;
//	         P:{R}:l:L on a Redis Cluster, where a batch holds one room.
//	         It expires with WithRoomTTL.
//
// Times come from the server (TIME), so every node agrees on them.
//
// Wire format of what the scripts PUBLISH (f(x) is len(x) ":" x):
//
//	'm' f(epoch) f(seq) f(id) f(time) data
//	'j' f(epoch) f(time) record          a member's first connection joined
//	'l' f(epoch) f(time) record          a member's last connection left
//
// where record = f(conn id) f(user id) f(info), built by the node that
// joined it.
const luaPrelude = `
local function f(s) return string.format('%d:%s', #s, s) end
local function now_us()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000000 + tonumber(t[2])
end
local function us(x) return string.format('%.0f', x) end
-- ensure returns the room's epoch, starting a new life (the candidate
-- epoch, an empty history) when the room's state is missing.
local function ensure(meta, hist, cand, idle)
  local e = redis.call('HGET', meta, 'e')
  if e then return e end
  redis.call('DEL', hist)
  redis.call('HSET', meta, 'e', cand, 's', 0)
  redis.call('PEXPIRE', meta, idle)
  return cand
end
-- touch keeps an existing room's state for at least idle ms more.
local function touch(meta, idle)
  local ttl = redis.call('PTTL', meta)
  if ttl >= 0 and ttl < idle then redis.call('PEXPIRE', meta, idle) end
end
-- trim drops history entries older than cutoff (µs) among the oldest
-- scan; it returns true when it dropped all of them (more may be old).
local function trim(hist, cutoff, scan)
  local old = redis.call('XRANGE', hist, '-', '+', 'COUNT', scan)
  local n = 0
  for i, en in ipairs(old) do
    if tonumber(en[2][4]) >= cutoff then break end
    n = i
  end
  if n == 0 then return false end
  if n < #old then
    redis.call('XTRIM', hist, 'MINID', old[n + 1][1])
    return false
  end
  local last = tonumber(string.sub(old[n][1], 3))
  redis.call('XTRIM', hist, 'MINID', '0-' .. string.format('%d', last + 1))
  return n == scan
end
-- entries appends stream entries to out as seq, then f(id) f(time) data.
local function entries(out, list, from, to, step)
  for i = from, to, step do
    local en = list[i]
    out[#out + 1] = string.sub(en[1], 3)
    out[#out + 1] = f(en[2][2]) .. f(en[2][4]) .. en[2][6]
  end
  return out
end
-- parse splits a stored presence value: flag, member key, record.
local function parse(v)
  local colon = string.find(v, ':', 2, true)
  local n = tonumber(string.sub(v, 2, colon - 1))
  return string.sub(v, 1, 1), string.sub(v, colon + 1, colon + n), string.sub(v, colon + n + 1)
end
-- clean removes presence entries that expired by now (ms), at most max
-- (0: all), announcing the members whose last connection they were.
local function clean(p, c, u, now, e, ts, channel, max)
  local gone
  if max > 0 then
    gone = redis.call('ZRANGEBYSCORE', p, '-inf', now, 'LIMIT', 0, max)
  else
    gone = redis.call('ZRANGEBYSCORE', p, '-inf', now)
  end
  for _, conn in ipairs(gone) do
    local v = redis.call('HGET', c, conn)
    redis.call('ZREM', p, conn)
    redis.call('HDEL', c, conn)
    if v then
      local flag, ukey, rec = parse(v)
      if redis.call('HINCRBY', u, ukey, -1) <= 0 then
        redis.call('HDEL', u, ukey)
        if flag == '1' then redis.call('PUBLISH', channel, 'l' .. f(e) .. f(ts) .. rec) end
      end
    end
  end
end
-- add adds or refreshes a connection's presence entry, announcing a
-- member's first connection when its flag asks for events.
local function add(p, c, u, conn, ukey, flag, rec, score, e, ts, channel)
  local fresh = not redis.call('ZSCORE', p, conn)
  redis.call('ZADD', p, score, conn)
  if fresh then
    redis.call('HSET', c, conn, flag .. f(ukey) .. rec)
    if redis.call('HINCRBY', u, ukey, 1) == 1 and flag == '1' then
      redis.call('PUBLISH', channel, 'j' .. f(e) .. f(ts) .. rec)
    end
  end
end
`

// publishScript sequences, stores and fans out a batch of messages, for
// one or more rooms, in one atomic step.
//
// KEYS: the lane, then per room: meta, hist, then the idempotency keys of
// that room's keyed messages, in order.
// ARGV: batch id, idle ms (the room's state and the lane record live that
// long); then per room, until the arguments end: messages (negated when
// any of its messages has a key: a keyed room), size, ttl ms; then per
// message: id, data and, in a keyed room only, key ttl ms (0: no key).
// The room's channel is its meta key without ":m". Every argument costs
// Redis a string made twice (the request's, then Lua's), so there are as
// few as that allows. A room with no state starts its new life with the
// batch id as its epoch (unique per room life, which is all an epoch must
// be).
//
// It returns f(batch id), then, per message in order, f(epoch) f(seq)
// f(time) f(dup), where dup is empty for a message it sequenced and, for
// a key seen before, the id of the message that key sequenced (seq and
// time are that message's).
//
// It first reads what the lane holds: when that is this very batch, Redis
// ran it already (go-redis resent it after losing the reply), and it
// returns the first run's result without writing anything. Otherwise it
// goes through the rooms once, each room's reads (its epoch and sequence,
// each key's record) then its writes (an XADD and a PUBLISH, and a SET for
// a key, per message; one HSET and the expiries per room), building the
// result as it goes, and records the result in the lane key last. The
// script is atomic, so nothing sees a room between its reads and writes.
//
// Messages are kept by count (XADD MAXLEN ~, whole stream nodes at a
// time) and expire with the whole stream (PEXPIRE); the exact count bound
// and the age bound are applied when history is read (historyScript), so
// a publish never reads the stream. The expiries are extended to a tenth
// more than they must be, and only by the publishes that find that tenth
// used up, the history TTL changed or the stream new (XADD NOMKSTREAM
// tells, in the same call): a busy room's publishes mostly skip both
// PEXPIREs, and still every message outlives its TTL and the room's state
// its idle time.
var publishScript = redis.NewScript(publishLua)

const publishLua = `
-- f frames s as len ':' s. Lua's string.format, and its own conversion
-- of a number to a string (printf %.14g), cost Redis about a microsecond
-- each: lengths under 100 are framed with string.char instead.
-- lp is f's prefix alone, so that a longer concatenation can frame a
-- string in place instead of making the framed string first.
local char, sub, byte = string.char, string.sub, string.byte
local function lp(n)
  if n < 10 then return char(48 + n, 58) end
  if n < 100 then return char(48 + (n - n % 10) / 10, 48 + n % 10, 58) end
  return string.format('%d:', n)
end
local function f(s) return lp(#s) .. s end
-- inc returns the decimal string s plus one, without a number's
-- conversion to a string unless the last digit carries.
local function inc(s)
  local n = #s
  local b = byte(s, n)
  if b < 57 then return sub(s, 1, n - 1) .. char(b + 1) end
  return string.format('%d', tonumber(s) + 1)
end
local lane, batch, idles = KEYS[1], ARGV[1], ARGV[2]
-- The result, which starts with the batch id, is also the lane's record.
local fb = f(batch)
local held = redis.call('GET', lane)
if held and string.find(held, fb, 1, true) == 1 then return held end
-- Stream entries keep the fields earlier versions wrote (i, t, d), so
-- nodes of both can share a Redis while a cluster is upgraded.
local t = redis.call('TIME')
local pad = {'00000', '0000', '000', '00', '0', ''}
local ts = t[1] .. pad[#t[2]] .. t[2]
local fts = f(ts)
-- Now in ms as a string, compared with the room's x as a string when
-- both have the same number of digits (any time before 2286).
local nowms = sub(ts, 1, -4)
local out = {fb}
local ki, ai, nargs = 2, 3, #ARGV
while ai <= nargs do
  local meta, hist = KEYS[ki], KEYS[ki + 1]
  local n, sizes, ttls, step = tonumber(ARGV[ai]), ARGV[ai + 1], ARGV[ai + 2], 2
  if n < 0 then n, step = -n, 3 end
  local channel = sub(meta, 1, -3)
  ki, ai = ki + 2, ai + 3
  local st = redis.call('HMGET', meta, 'e', 's', 'h', 'x', 'n')
  local e, seq, fresh = st[1], st[2] or '0', false
  if not e then e, seq, fresh = batch, '0', true end
  local x = st[4]
  local renew = fresh or not x or st[3] ~= ttls
  if not renew then
    if #x == #nowms then renew = nowms >= x else renew = tonumber(nowms) >= tonumber(x) end
  end
  local keep = sizes ~= '0'
  if fresh or not keep then redis.call('DEL', hist) end
  local fe = f(e)
  -- seen: the keys this batch sequenced in this room, for a key that
  -- comes twice in a fresh room (whose key records are not read).
  local seen, last
  for _ = 1, n do
    local mid, data = ARGV[ai], ARGV[ai + 1]
    local kkey, d
    if step == 3 and ARGV[ai + 2] ~= '0' then
      kkey = KEYS[ki]
      ki = ki + 1
      seen = seen or {}
      d = seen[kkey]
      if not d and not fresh then
        local prev = redis.call('GET', kkey)
        if prev then
          local pe, ps, pi, pt = string.match(prev, '^(%S+) (%S+) (%S+) (%S+)$')
          if pe == e then d = {ps, pt, pi} end
        end
      end
    end
    if d then
      out[#out + 1] = fe .. f(d[1]) .. f(d[2]) .. f(d[3])
    else
      seq = inc(seq)
      last = seq
      local fsq = f(seq)
      if keep then
        local id = '0-' .. seq
        if not redis.call('XADD', hist, 'NOMKSTREAM', 'MAXLEN', '~', sizes, id, 'i', mid, 't', ts, 'd', data) then
          -- A new stream: it needs its expiry.
          redis.call('XADD', hist, 'MAXLEN', '~', sizes, id, 'i', mid, 't', ts, 'd', data)
          renew = true
        end
      end
      redis.call('PUBLISH', channel, 'm' .. fe .. fsq .. lp(#mid) .. mid .. fts .. data)
      if kkey then
        redis.call('SET', kkey, e .. ' ' .. seq .. ' ' .. mid .. ' ' .. ts, 'PX', ARGV[ai + 2])
        seen[kkey] = {seq, ts, mid}
      end
      out[#out + 1] = fe .. fsq .. fts .. '0:'
    end
    ai = ai + step
  end
  if not last then
    -- Only duplicates: the room's sequence is unchanged.
  elseif not renew and st[5] == sizes then
    -- Not fresh, the same history TTL and size: only the sequence moved.
    redis.call('HSET', meta, 's', last)
  else
    local hset = {'HSET', meta, 's', last, 'h', ttls, 'n', sizes}
    if fresh then hset[#hset + 1], hset[#hset + 2] = 'e', e end
    if renew then
      -- Each key lives a tenth longer than it must, so that the room's
      -- next publishes, for that tenth, need not extend it again.
      local ttl, idle = tonumber(ttls), tonumber(idles)
      local life, hl = idle, ttl
      if ttl > life then life = ttl end
      if hl == 0 then hl = idle end
      local due = life
      if keep and hl < due then due = hl end
      hset[#hset + 1], hset[#hset + 2] = 'x', string.format('%d', tonumber(nowms) + math.floor(due / 10))
      redis.call(unpack(hset))
      if keep then redis.call('PEXPIRE', hist, string.format('%d', hl + math.floor(hl / 10))) end
      redis.call('PEXPIRE', meta, string.format('%d', life + math.floor(life / 10)))
    else
      redis.call(unpack(hset))
    end
  end
end
local result
if #out == 2 then result = fb .. out[2] else result = table.concat(out) end
redis.call('SET', lane, result, 'PX', idles)
return result
`

// historyScript reads the room's position and the entries a query selects,
// starting the room's life when it has none.
// KEYS: meta, hist. ARGV: since, limit, latest (1/0), epoch candidate, idle ms.
// Returns epoch, top, then seq and f(id) f(time) data per entry.
var historyScript = redis.NewScript(luaPrelude + `
local meta, hist = KEYS[1], KEYS[2]
local e = redis.call('HGET', meta, 'e')
if not e then
  return {ensure(meta, hist, ARGV[4], tonumber(ARGV[5])), '0'}
end
local st = redis.call('HMGET', meta, 's', 'h', 'n')
local out = {e, st[1]}
local limit = tonumber(ARGV[2])
if limit <= 0 then return out end
local ttl = tonumber(st[2] or '0')
if ttl > 0 then
  local cutoff = now_us() - ttl * 1000
  while trim(hist, cutoff, 100) do end
end
-- The stream is trimmed only roughly (XADD MAXLEN ~): the room's size
-- bounds what a read returns.
local since = ARGV[1]
if st[3] then
  local lo = tonumber(st[1] or '0') - tonumber(st[3])
  if lo > tonumber(since) then since = string.format('%d', lo) end
end
if ARGV[3] == '1' then
  local list = redis.call('XREVRANGE', hist, '+', '(0-' .. since, 'COUNT', limit)
  return entries(out, list, #list, 1, -1)
end
local list = redis.call('XRANGE', hist, '(0-' .. since, '+', 'COUNT', limit)
return entries(out, list, 1, #list, 1)
`)

// rangeScript reads kept entries after from, up to to ('+' for the newest),
// within the room's size but with no age filter: a node filling a gap
// takes whatever the history still promises.
// KEYS: meta, hist. ARGV: from, to, limit.
// Returns nothing when the room has no state; else like historyScript.
var rangeScript = redis.NewScript(luaPrelude + `
local st = redis.call('HMGET', KEYS[1], 'e', 's', 'n')
if not st[1] then return {} end
local out = {st[1], st[2]}
local hi = ARGV[2]
if hi ~= '+' then hi = '0-' .. hi end
local from = ARGV[1]
if st[3] then
  local lo = tonumber(st[2] or '0') - tonumber(st[3])
  if lo > tonumber(from) then from = string.format('%d', lo) end
end
local list = redis.call('XRANGE', KEYS[2], '(0-' .. from, hi, 'COUNT', ARGV[3])
return entries(out, list, 1, #list, 1)
`)

// joinScript adds a connection to the room's presence.
// KEYS: meta, hist, p, c, u. ARGV: conn, member key, events (1/0), record,
// ttl ms, key ttl ms, epoch candidate, idle ms, channel.
var joinScript = redis.NewScript(luaPrelude + `
local idle = tonumber(ARGV[8])
local e = ensure(KEYS[1], KEYS[2], ARGV[7], idle)
touch(KEYS[1], idle)
local now = now_us()
local ts, ms = us(now), math.floor(now / 1000)
clean(KEYS[3], KEYS[4], KEYS[5], ms, e, ts, ARGV[9], 1000)
add(KEYS[3], KEYS[4], KEYS[5], ARGV[1], ARGV[2], ARGV[3], ARGV[4], ms + tonumber(ARGV[5]), e, ts, ARGV[9])
for i = 3, 5 do redis.call('PEXPIRE', KEYS[i], ARGV[6]) end
return 1
`)

// leaveScript removes a connection from the room's presence.
// KEYS: meta, p, c, u. ARGV: conn, events (1/0), channel.
var leaveScript = redis.NewScript(luaPrelude + `
local e = redis.call('HGET', KEYS[1], 'e') or ''
local now = now_us()
local ts, ms = us(now), math.floor(now / 1000)
clean(KEYS[2], KEYS[3], KEYS[4], ms, e, ts, ARGV[3], 1000)
local v = redis.call('HGET', KEYS[3], ARGV[1])
if not v then return 0 end
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('HDEL', KEYS[3], ARGV[1])
local flag, ukey, rec = parse(v)
if redis.call('HINCRBY', KEYS[4], ukey, -1) <= 0 then
  redis.call('HDEL', KEYS[4], ukey)
  if ARGV[2] == '1' then redis.call('PUBLISH', ARGV[3], 'l' .. f(e) .. f(ts) .. rec) end
end
return 1
`)

// presenceScript lists the room's live presence entries.
// KEYS: meta, p, c, u. ARGV: counts only (1/0), channel.
// Returns members, connections; or every stored value.
var presenceScript = redis.NewScript(luaPrelude + `
local e = redis.call('HGET', KEYS[1], 'e') or ''
local now = now_us()
clean(KEYS[2], KEYS[3], KEYS[4], math.floor(now / 1000), e, us(now), ARGV[2], 0)
if ARGV[1] == '1' then
  return {redis.call('HLEN', KEYS[4]), redis.call('ZCARD', KEYS[2])}
end
return redis.call('HVALS', KEYS[3])
`)

// refreshScript keeps a room alive for a node: it extends the room's state
// and this node's presence entries, re-adding those that vanished (expired
// while the node could not reach Redis, or lost in a restart), and cleans
// other nodes' expired entries.
// KEYS: meta, hist, p, c, u. ARGV: ttl ms, key ttl ms, epoch candidate,
// idle ms, channel, then conn, member key, events, record per member.
var refreshScript = redis.NewScript(luaPrelude + `
local idle = tonumber(ARGV[4])
local n = (#ARGV - 5) / 4
local e
if n > 0 then
  e = ensure(KEYS[1], KEYS[2], ARGV[3], idle)
else
  e = redis.call('HGET', KEYS[1], 'e') or ''
end
touch(KEYS[1], idle)
local now = now_us()
local ts, ms = us(now), math.floor(now / 1000)
clean(KEYS[3], KEYS[4], KEYS[5], ms, e, ts, ARGV[5], 1000)
local score = ms + tonumber(ARGV[1])
for i = 0, n - 1 do
  local j = 6 + i * 4
  add(KEYS[3], KEYS[4], KEYS[5], ARGV[j], ARGV[j + 1], ARGV[j + 2], ARGV[j + 3], score, e, ts, ARGV[5])
end
if n > 0 then
  for i = 3, 5 do redis.call('PEXPIRE', KEYS[i], ARGV[2]) end
end
return 1
`)
