-- The publish script of redisbroker at 242384c (before batches), prelude
-- included, verbatim: the upgrade test runs it beside the current one.

local function f(s) return #s .. ':' .. s end
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
-- entries appends stream entries to out as seq, id, time, data.
local function entries(out, list, from, to, step)
  for i = from, to, step do
    local en = list[i]
    out[#out + 1] = string.sub(en[1], 3)
    out[#out + 1] = en[2][2]
    out[#out + 1] = en[2][4]
    out[#out + 1] = en[2][6]
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

local meta, hist, kkey = KEYS[1], KEYS[2], KEYS[3]
local size, ttl, idle = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local e = redis.call('HGET', meta, 'e')
if e then
  local last = redis.call('HMGET', meta, 'l', 's', 't')
  if last[1] == ARGV[2] then return {e, last[2], last[3]} end
  if kkey then
    local prev = redis.call('GET', kkey)
    if prev then
      local pe, ps, pi, pt = string.match(prev, '^(%S+) (%S+) (%S+) (%S+)$')
      if pe == e then return {pe, ps, pt, pi} end
    end
  end
else
  e = ensure(meta, hist, ARGV[3], idle)
end
local seq = string.format('%d', redis.call('HINCRBY', meta, 's', 1))
local now = now_us()
local ts = us(now)
redis.call('HSET', meta, 'l', ARGV[2], 't', ts, 'h', ttl)
if size > 0 then
  redis.call('XADD', hist, 'MAXLEN', size, '0-' .. seq, 'i', ARGV[2], 't', ts, 'd', ARGV[1])
  if ttl > 0 then
    trim(hist, now - ttl * 1000, 8)
    redis.call('PEXPIRE', hist, ttl)
  else
    redis.call('PEXPIRE', hist, idle)
  end
else
  redis.call('DEL', hist)
end
if ttl > idle then idle = ttl end
redis.call('PEXPIRE', meta, idle)
redis.call('PUBLISH', ARGV[7], 'm' .. f(e) .. f(seq) .. f(ARGV[2]) .. f(ts) .. ARGV[1])
if kkey then redis.call('SET', kkey, e .. ' ' .. seq .. ' ' .. ARGV[2] .. ' ' .. ts, 'PX', ARGV[8]) end
return {e, seq, ts}
