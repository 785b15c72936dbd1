-- Lease: ready → preempted for a placement, and that placement's reservation, in one step
-- (one region). The victims end only if, with their units back, every pool of the new
-- leases has room for the new leases' units summed per pool; otherwise nothing changes. A
-- victim already gone (another preemptor took it, or it ended) or no longer interruptible
-- refuses the whole step: the caller picks again. So a victim never ends for a placement
-- that did not happen, and one victim is never claimed by two preemptors.
-- Generations (lua/reserve.lua): a victim frees units only on the pool generation it was
-- granted on, and a new lease is refused on a pool that is not the generation it names.
-- KEYS[1] region lease-expiry zset, KEYS[2] the region's leases-ready marker, KEYS[3] the
--   region's set of interruptible leases; per victim v (0-based): KEYS[4+3v] its pool hash,
--   KEYS[5+3v] that pool's lease set, KEYS[6+3v] its lease hash; then per new lease i from
--   b = 4 + 3 * nv: KEYS[b+3i] pool hash, KEYS[b+1+3i] the pool's lease set, KEYS[b+2+3i] lease hash;
--   then (optional) KEYS[b+3n] the region's provisioning zset (a victim still provisioning leaves it),
--   KEYS[b+3n+1] the region's lease outbox (optional: the victims' events owed, docs/lifecycle.md "Outbox")
-- ARGV[1] nv victims, ARGV[2] n new leases, ARGV[3] the new leases' provisional expiry (they
--   are pending until the broker, their grants durable, confirms them: lua/confirm.lua);
--   ARGV[4+v] victim lease id; per new lease i from c = 4 + nv: ARGV[c+7i] lease id,
--   ARGV[c+1+7i] units, ARGV[c+2+7i] lease json, ARGV[c+3+7i] interruptible (1/0),
--   ARGV[c+4+7i] the pool generation it was matched on (0 = whichever is there),
--   ARGV[c+5+7i] milli of each device (1000: whole), ARGV[c+6+7i] device hint ('' none);
--   with the outbox, from t = c + 7n: ARGV[t] a victim's event type, ARGV[t+1] its at,
--   ARGV[t+2] its other fields (json); ARGV[t+3..t+4] the type and other fields for a victim
--   never confirmed (pending: it ends at its grant time, ARGV[t+6+v] of victim v); ARGV[t+5]
--   now (unix s: the sweep's grace counts from it)
-- Shares (docs/sharing.md): a victim on a pool that shares its devices gives its milli back
-- to its devices; a new lease on such a pool takes devices by the rule of lua/reserve.lua,
-- chosen among the devices as they are with every victim's milli back. A share asked of a
-- pool that does not share, or below its min_milli, or above its max_milli (a whole device
-- counting as 1000), finds no room.
-- Reply: {1, {per new lease: free after, or on a sharing pool {free after, {devices},
--   {their free milli after}}}, {per victim: {lease json, seq, free after, pending,
--   {its devices' free milli after} (a sharing pool)}}}
--   or {0, 1, v} victim v (1-based) gone or not interruptible, {0, 2, i, room} not enough room
--   for new lease i's pool, {0, 3, i} new lease i exists already, {-1} leases not restored yet
local nv, n, expires = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local b, c = 4 + 3 * nv, 4 + nv
local prov = KEYS[b + 3 * n]
if redis.call('EXISTS', KEYS[2]) == 0 then return {-1} end

local freed, victim_units, seen = {}, {}, {}
for v = 0, nv - 1 do
  local pool, lease, id = KEYS[4 + 3 * v], KEYS[6 + 3 * v], ARGV[4 + v]
  local lf = redis.call('HMGET', lease, 'units', 'generation')
  local units = tonumber(lf[1])
  if not units or seen[id] or redis.call('SISMEMBER', KEYS[3], id) == 0 then return {0, 1, v + 1} end
  seen[id] = true
  local have = tonumber(redis.call('HGET', pool, 'generation')) or 0
  if cb_same_generation(tonumber(lf[2]) or 0, have) then victim_units[v] = units else victim_units[v] = 0 end
  freed[pool] = (freed[pool] or 0) + victim_units[v]
end

-- a sharing pool's devices as they would be with every victim's milli back, and the wholly
-- free devices it may give (its healthy units less the devices in use)
local devs, wholes, sf = {}, {}, {}
local function devices_after_victims(pool)
  local d = cb_read_devices(pool)
  for v = 0, nv - 1 do
    if KEYS[4 + 3 * v] == pool and victim_units[v] > 0 then
      local lf = redis.call('HMGET', KEYS[6 + 3 * v], 'devices', 'milli')
      for _, x in ipairs(cb_split_devices(lf[1])) do
        if d[x] then d[x] = math.min(CB_MILLI, d[x] + (tonumber(lf[2]) or CB_MILLI)) end
      end
    end
  end
  local f = redis.call('HMGET', pool, 'capacity', 'healthy', 'alive', 'draining', 'upn', 'min_milli', 'max_milli')
  local capacity, healthy = tonumber(f[1]) or 0, tonumber(f[2]) or -1
  local effective = capacity
  if healthy >= 0 and healthy < capacity then effective = healthy end
  local in_use = 0
  for _, free in pairs(d) do if free < CB_MILLI then in_use = in_use + 1 end end
  wholes[pool] = math.max(0, effective - in_use)
  if cb_status_of(tonumber(f[3]) or 0, tonumber(f[4]) or 0) ~= 'online' then wholes[pool] = -1 end
  sf[pool] = {capacity, tonumber(f[5]) or 8, tonumber(f[6]) or 1, tonumber(f[7]) or CB_MILLI}
  return d
end

local want, order, picked = {}, {}, {}
for i = 0, n - 1 do
  local pool = KEYS[b + 3 * i]
  if redis.call('EXISTS', KEYS[b + 2 + 3 * i]) == 1 then return {0, 3, i + 1} end
  local have = tonumber(redis.call('HGET', pool, 'generation')) or 0
  if not cb_same_generation(tonumber(ARGV[c + 4 + 7 * i]) or 0, have) then return {0, 2, i + 1, 0} end
  local units, milli = tonumber(ARGV[c + 1 + 7 * i]), tonumber(ARGV[c + 5 + 7 * i]) or CB_MILLI
  if redis.call('HGET', pool, 'sharing') then
    if not devs[pool] then devs[pool] = devices_after_victims(pool) end
    if wholes[pool] < 0 or milli < sf[pool][3] or milli > sf[pool][4] then return {0, 2, i + 1, 0} end
    local chosen = cb_pick_devices(devs[pool], sf[pool][1], sf[pool][2], units, milli,
      cb_split_devices(ARGV[c + 6 + 7 * i]), wholes[pool])
    if not chosen then return {0, 2, i + 1, wholes[pool]} end
    for _, d in ipairs(chosen) do
      if devs[pool][d] >= CB_MILLI then wholes[pool] = wholes[pool] - 1 end
      devs[pool][d] = devs[pool][d] - milli
    end
    picked[i] = chosen
  else
    if milli < CB_MILLI then return {0, 2, i + 1, 0} end  -- a share, of a pool that does not share
    if not want[pool] then want[pool] = 0; order[#order + 1] = {pool, i} end
    want[pool] = want[pool] + units
  end
end
for _, entry in ipairs(order) do
  local pool, i = entry[1], entry[2]
  local f = redis.call('HMGET', pool, 'capacity', 'healthy', 'leased', 'alive', 'draining')
  local capacity, healthy, leased = tonumber(f[1]) or 0, tonumber(f[2]) or -1, tonumber(f[3]) or 0
  local effective = capacity
  if healthy >= 0 and healthy < capacity then effective = healthy end
  local room = 0
  if cb_status_of(tonumber(f[4]) or 0, tonumber(f[5]) or 0) == 'online' then
    room = math.max(0, effective - math.max(0, leased - (freed[pool] or 0)))
  end
  if redis.call('EXISTS', pool) == 0 or room < want[pool] then return {0, 2, i + 1, room} end
end

-- it fits: the victims end, the new leases take their units
local ended = {}
for v = 0, nv - 1 do
  local pool, leases, lease, id = KEYS[4 + 3 * v], KEYS[5 + 3 * v], KEYS[6 + 3 * v], ARGV[4 + v]
  local f = redis.call('HMGET', lease, 'info', 'seq', 'pending', 'devices', 'milli')
  local devices_after = {}
  if redis.call('EXISTS', pool) == 1 and victim_units[v] > 0 and f[4] then
    devices_after = cb_give_devices(pool, cb_split_devices(f[4]), tonumber(f[5]) or CB_MILLI)
  elseif redis.call('EXISTS', pool) == 1 and victim_units[v] > 0 and not redis.call('HGET', pool, 'sharing') then
    local leased = tonumber(redis.call('HGET', pool, 'leased')) or 0
    redis.call('HSET', pool, 'leased', math.max(0, leased - victim_units[v]))
  end
  redis.call('DEL', lease)
  redis.call('SREM', leases, id)
  redis.call('ZREM', KEYS[1], id)
  redis.call('SREM', KEYS[3], id)
  if prov then redis.call('ZREM', prov, id) end
  ended[v + 1] = {f[1], tonumber(f[2]) + 1, pool, tonumber(f[3]) or 0, devices_after}
end
local took = {}  -- per new lease on a sharing pool: its devices' free milli after
for i = 0, n - 1 do
  local pool, leases, lease = KEYS[b + 3 * i], KEYS[b + 1 + 3 * i], KEYS[b + 2 + 3 * i]
  local id, units, interruptible = ARGV[c + 7 * i], tonumber(ARGV[c + 1 + 7 * i]), ARGV[c + 3 + 7 * i]
  local gen = tonumber(ARGV[c + 4 + 7 * i]) or 0
  if gen == 0 then gen = tonumber(redis.call('HGET', pool, 'generation')) or 0 end
  local info = ARGV[c + 2 + 7 * i]
  if picked[i] then
    local milli = tonumber(ARGV[c + 5 + 7 * i])
    took[i] = cb_take_devices(pool, picked[i], milli)
    info = cb_with_devices(info, picked[i])
    redis.call('HSET', lease, 'milli', milli, 'devices', table.concat(picked[i], ','))
  else
    redis.call('HINCRBY', pool, 'leased', units)
  end
  redis.call('HSET', lease, 'info', info, 'units', units, 'expires', expires, 'seq', 1,
    'interruptible', interruptible, 'pool', pool, 'pending', 1, 'generation', gen)
  redis.call('SADD', leases, id)
  if interruptible == '1' then redis.call('SADD', KEYS[3], id) end
  redis.call('ZADD', KEYS[1], expires, id)
end
local free = {}
local function free_of(pool)
  if free[pool] == nil then
    if redis.call('EXISTS', pool) == 1 then free[pool] = cb_recompute(pool)[2] else free[pool] = -1 end
  end
  return free[pool]
end
local placed, victims = {}, {}
for i = 0, n - 1 do
  placed[i + 1] = free_of(KEYS[b + 3 * i])
  if picked[i] then placed[i + 1] = {placed[i + 1], picked[i], took[i]} end
end
local outbox, t = KEYS[b + 3 * n + 1], c + 7 * n
for v = 1, nv do
  local e = ended[v]
  victims[v] = {e[1], e[2], free_of(e[3]), e[4], e[5]}
  if outbox then  -- each victim's event, owed until published (the sweep republishes it)
    local k, at, x = ARGV[t], ARGV[t + 1], ARGV[t + 2]
    if e[4] == 1 then k, at, x = ARGV[t + 3], ARGV[t + 5 + v], ARGV[t + 4] end
    redis.call('HSET', outbox, ARGV[3 + v] .. '.' .. e[2], cjson.encode({k = k, i = e[1], s = e[2],
      f = victims[v][3], p = e[4], t = at, x = x, w = ARGV[t + 5], d = table.concat(e[5], ',')}))
  end
end
return {1, placed, victims}
