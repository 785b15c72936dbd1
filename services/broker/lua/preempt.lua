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
--   then (optional) KEYS[b+3n] the region's provisioning zset (a victim still provisioning leaves it)
-- ARGV[1] nv victims, ARGV[2] n new leases, ARGV[3] the new leases' provisional expiry (they
--   are pending until the broker, their grants durable, confirms them: lua/confirm.lua);
--   ARGV[4+v] victim lease id; per new lease i from c = 4 + nv: ARGV[c+5i] lease id,
--   ARGV[c+1+5i] units, ARGV[c+2+5i] lease json, ARGV[c+3+5i] interruptible (1/0),
--   ARGV[c+4+5i] the pool generation it was matched on (0 = whichever is there)
-- Shares (docs/sharing.md): a victim on a pool that shares its devices gives its milli back
-- to its devices; a new lease on such a pool is refused (no room): preemption does not
-- place on sharing pools yet, the request waits in the queue instead.
-- Reply: {1, {free after, per new lease}, {per victim: {lease json, seq, free after, pending,
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

local want, order = {}, {}
for i = 0, n - 1 do
  local pool = KEYS[b + 3 * i]
  if redis.call('EXISTS', KEYS[b + 2 + 3 * i]) == 1 then return {0, 3, i + 1} end
  local have = tonumber(redis.call('HGET', pool, 'generation')) or 0
  if not cb_same_generation(tonumber(ARGV[c + 4 + 5 * i]) or 0, have) then return {0, 2, i + 1, 0} end
  if redis.call('HGET', pool, 'sharing') then return {0, 2, i + 1, 0} end
  if not want[pool] then want[pool] = 0; order[#order + 1] = {pool, i} end
  want[pool] = want[pool] + tonumber(ARGV[c + 1 + 5 * i])
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
for i = 0, n - 1 do
  local pool, leases, lease = KEYS[b + 3 * i], KEYS[b + 1 + 3 * i], KEYS[b + 2 + 3 * i]
  local id, units, interruptible = ARGV[c + 5 * i], tonumber(ARGV[c + 1 + 5 * i]), ARGV[c + 3 + 5 * i]
  local gen = tonumber(ARGV[c + 4 + 5 * i]) or 0
  if gen == 0 then gen = tonumber(redis.call('HGET', pool, 'generation')) or 0 end
  redis.call('HINCRBY', pool, 'leased', units)
  redis.call('HSET', lease, 'info', ARGV[c + 2 + 5 * i], 'units', units, 'expires', expires, 'seq', 1,
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
for i = 0, n - 1 do placed[i + 1] = free_of(KEYS[b + 3 * i]) end
for v = 1, nv do
  local e = ended[v]
  victims[v] = {e[1], e[2], free_of(e[3]), e[4], e[5]}
end
return {1, placed, victims}
