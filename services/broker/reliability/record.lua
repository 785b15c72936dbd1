-- One allocation event into the reliability record (docs/reliability.md), atomically.
-- The record keeps the facts seen of each lease (granted, ready, its end); what a lease
-- adds to its pool's and provider's counters is a function of those facts alone, and the
-- script adds the difference that this event's fact makes. A fact seen before (an event
-- redelivered) makes none; events of a lease in any order end in the same counters.
--
-- KEYS: 1 lease facts, 2 pool counters, 3 provider counters, 4 pool ready window,
--       5 provider ready window, 6 provider's pools, 7 score map, 8 version, 9 since
-- ARGV: 1 kind (seen | ready | failed | lost | end), 2 event at (unix ms),
--       3 granted at (unix ms), 4 delivers ("1" | "0"), 5 pool id, 6 window size,
--       7 ttl of a live lease's facts (s), 8 ttl once ended (s), 9 prior good, 10 prior bad
-- Returns 1 if the record changed, 0 for a fact already known, -1 if the record is not
-- there (Redis is new or was lost: the feed replays the stream into it first).
if redis.call('EXISTS', KEYS[9]) == 0 then
  return -1
end
local kind, at = ARGV[1], tonumber(ARGV[2])

local f = redis.call('HMGET', KEYS[1], 'g', 'dv', 'r', 'e', 'ea')
-- (a missing field is false, not nil)
local old = {g = tonumber(f[1] or nil), dv = f[2] or nil, r = tonumber(f[3] or nil), e = f[4] or nil,
             ea = tonumber(f[5] or nil)}
local new = {g = old.g, dv = old.dv, r = old.r, e = old.e, ea = old.ea}
if new.g == nil then
  new.g, new.dv = tonumber(ARGV[3]), ARGV[4]
end
if kind == 'ready' and new.r == nil then
  new.r = at
elseif (kind == 'failed' or kind == 'lost' or kind == 'end') and new.e == nil then
  new.e, new.ea = kind, at
end
if new.g == old.g and new.r == old.r and new.e == old.e then
  return 0
end

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

local a, b = adds(old), adds(new)
local scored = false
for _, field in ipairs({'d', 'f', 'l', 'hc', 'on', 'os'}) do
  local delta = b[field] - a[field]
  if delta ~= 0 then
    local n = string.format('%d', delta)
    redis.call('HINCRBY', KEYS[2], field, n)
    redis.call('HINCRBY', KEYS[3], field, n)
    if field == 'd' or field == 'f' or field == 'l' then scored = true end
  end
end

redis.call('HSET', KEYS[1], 'g', string.format('%d', new.g), 'dv', new.dv)
if new.r ~= nil then redis.call('HSET', KEYS[1], 'r', string.format('%d', new.r)) end
if new.e ~= nil then
  redis.call('HSET', KEYS[1], 'e', new.e, 'ea', string.format('%d', new.ea))
  redis.call('EXPIRE', KEYS[1], tonumber(ARGV[8]))
else
  redis.call('EXPIRE', KEYS[1], tonumber(ARGV[7]))
end

local window = tonumber(ARGV[6])
if old.r == nil and new.r ~= nil and new.dv == '1' then
  local took = string.format('%.3f', math.max(0, new.r - new.g) / 1000)
  for _, key in ipairs({KEYS[4], KEYS[5]}) do
    redis.call('LPUSH', key, took)
    redis.call('LTRIM', key, 0, window - 1)
  end
end

redis.call('SADD', KEYS[6], ARGV[5])
if scored then
  local good, bad = tonumber(ARGV[9]), tonumber(ARGV[10])
  local c = redis.call('HMGET', KEYS[2], 'd', 'f', 'l')
  local d, fl, l = tonumber(c[1] or '0'), tonumber(c[2] or '0'), tonumber(c[3] or '0')
  redis.call('HSET', KEYS[7], ARGV[5], string.format('%.6f', (d + good) / (d + fl + l + good + bad)))
  redis.call('INCR', KEYS[8])
end
return 1
