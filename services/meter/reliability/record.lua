-- A batch of allocation events into the reliability record (docs/reliability.md),
-- atomically. The record keeps the facts seen of each lease (granted, ready, its end);
-- what a lease adds to its pool's and provider's counters is a function of those facts
-- alone, and the script adds the difference that each event's fact makes. A fact seen
-- before (an event redelivered) makes none; events of a lease in any order end in the
-- same counters.
--
-- KEYS: 1 score map, 2 version, 3 since (the record's mark)
-- ARGV: 1 key prefix of the record (every key below starts with it: one hash slot),
--       2 the events, JSON: [[kind, at ms, granted at ms, delivers 1|0, lease, pool, provider], ...]
--         kind: seen | ready | failed | lost | end
--       3 window size, 4 ttl of a live lease's facts (s), 5 ttl once ended (s),
--       6 prior good, 7 prior bad
-- Returns one 1 (the record changed) or 0 (a fact already known) per event; or -1 if the
-- record is not there (Redis is new or was lost: the feed replays the stream into it) or
-- is being rebuilt (its mark is a replica's claim: record.py's REBUILDING).
local mark = redis.call('GET', KEYS[3])
if not mark or string.sub(mark, 1, 11) == 'rebuilding:' then
  return -1
end
local prefix = ARGV[1]
local events = cjson.decode(ARGV[2])
local window, live_ttl, ended_ttl = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local good, bad = tonumber(ARGV[6]), tonumber(ARGV[7])

-- what one lease adds, from its facts
local function adds(x)
  local c = {d = 0, f = 0, l = 0, hc = 0, on = 0, os = 0}
  if x.g == nil then return c end
  local delivers = x.dv == '1'
  if delivers and x.r ~= nil then c.d = 1 end
  if x.e == 'failed' or (x.e == 'lost' and delivers and x.r == nil) then c.f = 1 end
  if x.e == 'lost' and (not delivers or x.r ~= nil) then c.l = 1 end
  local start = x.g
  if delivers then start = x.r end
  if start ~= nil then
    if x.e ~= nil then
      c.hc = math.max(0, x.ea - start)
    else
      c.on, c.os = 1, start
    end
  end
  return c
end

local FIELDS = {'d', 'f', 'l', 'hc', 'on', 'os'}
local rescore = {}  -- pool -> its counters key, for pools whose score moved
local out = {}
for i, ev in ipairs(events) do
  local kind, at, granted, dv, lease, pool, provider = ev[1], ev[2], ev[3], tostring(ev[4]), ev[5], ev[6], ev[7]
  local facts = prefix .. 'lease:' .. lease
  local f = redis.call('HMGET', facts, 'g', 'dv', 'r', 'e', 'ea')
  -- (a missing field is false, not nil)
  local old = {g = tonumber(f[1] or nil), dv = f[2] or nil, r = tonumber(f[3] or nil), e = f[4] or nil,
               ea = tonumber(f[5] or nil)}
  local new = {g = old.g, dv = old.dv, r = old.r, e = old.e, ea = old.ea}
  if new.g == nil then
    new.g, new.dv = granted, dv
  end
  if kind == 'ready' and new.r == nil then
    new.r = at
  elseif (kind == 'failed' or kind == 'lost' or kind == 'end') and new.e == nil then
    new.e, new.ea = kind, at
  end
  if new.g == old.g and new.r == old.r and new.e == old.e then
    out[i] = 0
  else
    local pool_key, provider_key = prefix .. 'pool:' .. pool, prefix .. 'provider:' .. provider
    local a, b = adds(old), adds(new)
    for _, field in ipairs(FIELDS) do
      local delta = b[field] - a[field]
      if delta ~= 0 then
        local n = string.format('%d', delta)
        redis.call('HINCRBY', pool_key, field, n)
        redis.call('HINCRBY', provider_key, field, n)
        if field == 'd' or field == 'f' or field == 'l' then rescore[pool] = pool_key end
      end
    end
    redis.call('HSET', facts, 'g', string.format('%d', new.g), 'dv', new.dv)
    if new.r ~= nil then redis.call('HSET', facts, 'r', string.format('%d', new.r)) end
    if new.e ~= nil then
      redis.call('HSET', facts, 'e', new.e, 'ea', string.format('%d', new.ea))
      redis.call('EXPIRE', facts, ended_ttl)
    else
      redis.call('EXPIRE', facts, live_ttl)
    end
    if old.r == nil and new.r ~= nil and new.dv == '1' then
      local took = string.format('%.3f', math.max(0, new.r - new.g) / 1000)
      for _, key in ipairs({pool_key .. ':ready', provider_key .. ':ready'}) do
        redis.call('LPUSH', key, took)
        redis.call('LTRIM', key, 0, window - 1)
      end
    end
    redis.call('SADD', provider_key .. ':pools', pool)
    out[i] = 1
  end
end

local moved = false
for pool, key in pairs(rescore) do
  local c = redis.call('HMGET', key, 'd', 'f', 'l')
  local d, fl, l = tonumber(c[1] or '0'), tonumber(c[2] or '0'), tonumber(c[3] or '0')
  redis.call('HSET', KEYS[1], pool, string.format('%.6f', (d + good) / (d + fl + l + good + bad)))
  moved = true
end
if moved then redis.call('INCR', KEYS[2]) end
return out
