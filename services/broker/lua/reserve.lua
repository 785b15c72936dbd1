-- Reserve the allocations of one or more placements: each group (one placement's
-- allocations in one region) all or none, independently of the others. Many groups in
-- one call on a single Redis; one group per call on Redis Cluster (a region's keys share
-- a hash slot, different regions do not).
-- A lease is granted on one generation of its pool (one registration of that pool id,
-- from creation to removal) and touches no other: the broker names the generation it
-- matched on, and a group naming one that is no longer there is refused (the pool was
-- removed and registered again since the broker last heard of it).
-- ARGV[1] number of groups; then per group g, its arguments from offset a:
--   ARGV[a] mode ('check' = only if free, 'force' = restore after Redis loss),
--   ARGV[a+1] expires_at (for 'check' a provisional one: the lease is marked pending until
--   the broker, its grant durable, confirms it with the real expiry; an unconfirmed lease
--   ends at the provisional one, so a broker that dies in between leaks nothing for long),
--   ARGV[a+2] n allocations, then per allocation i (0-based): ARGV[a+3+7i] lease id,
--   ARGV[a+4+7i] units, ARGV[a+5+7i] lease json, ARGV[a+6+7i] interruptible (1/0),
--   ARGV[a+7+7i] the pool generation it was matched on (0 = whichever is there),
--   ARGV[a+8+7i] milli of each device (1000 = whole devices; less: a share of one device),
--   ARGV[a+9+7i] device hint ('3' or '0,1', '' or '-1' = the script picks; 'force': the
--   devices the lease holds)
-- KEYS per group g, from offset k: KEYS[k] region lease-expiry zset, KEYS[k+1] the region's
--   leases-ready marker, KEYS[k+2] the region's set of interruptible leases; then per
--   allocation i: KEYS[k+3+3i] pool hash, KEYS[k+4+3i] the pool's lease set, KEYS[k+5+3i]
--   the lease hash.
-- Shares (docs/sharing.md): on a pool that shares its devices (its per-device hash,
-- pool_state.lua) every lease names its devices. A share takes milli of one device: the
-- hinted one if it still has them, else the partly taken device with the least free milli
-- that fits, else a wholly free device on the node with the fewest wholly free ones. Whole
-- devices there are only wholly free ones, on one node when units <= units_per_node (the
-- node with the fewest that still fit). The lease json gets the devices chosen.
-- Reply: one entry per group: {1, after_1, ...} or {0, i (1-based), free_of_that_pool[, why]}
--   or {-1} (leases not restored yet after a Redis loss: refuse rather than book over them);
--   after_i: the pool's free units after, or on a sharing pool {free, {devices},
--   {devices' free milli after}}; why 'sharing': the pool takes no such share (it does not
--   share its devices, or the share is below its sharing.min_milli or above its
--   sharing.max_milli, a whole device counting as 1000); no device fits on a
--   sharing pool: {0, i, free, '', {free milli of devices 0..capacity-1}} (the broker's view
--   of them was stale: an event of an earlier grant may arrive after a later one's reply)
local function reserve(k, a)
  local mode, expires, n = ARGV[a], tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
  if mode == 'check' and redis.call('EXISTS', KEYS[k + 1]) == 0 then return {-1} end
  local gens, held, demand = {}, {}, {}  -- per allocation: its generation, whether its pool takes the units
  local devs, picked = {}, {}  -- sharing pools: free milli per device (this call's view); per allocation: its devices
  for i = 0, n - 1 do
    local pool, want = KEYS[k + 3 + 3 * i], tonumber(ARGV[a + 7 + 7 * i])
    local units, milli, hint = tonumber(ARGV[a + 4 + 7 * i]), tonumber(ARGV[a + 8 + 7 * i]), ARGV[a + 9 + 7 * i]
    local f = redis.call('HMGET', pool, 'generation', 'status', 'free', 'sharing')
    local have, free = tonumber(f[1]) or 0, tonumber(f[3]) or 0
    gens[i] = have
    if want ~= 0 then gens[i] = want end
    held[i] = f[2] ~= false and cb_same_generation(gens[i], have)
    local shares = held[i] and f[4] ~= false
    if mode == 'check' then
      if not cb_same_generation(want, have) then return {0, i + 1, 0} end
      local sf = {}  -- a sharing pool's upn, capacity, min_milli, max_milli (a pool that does not share reads none)
      if f[4] then sf = redis.call('HMGET', pool, 'upn', 'capacity', 'min_milli', 'max_milli') end
      if milli < CB_MILLI and (not f[4] or milli < (tonumber(sf[3]) or 1)) then return {0, i + 1, free, 'sharing'} end
      if f[4] and milli > (tonumber(sf[4]) or CB_MILLI) then return {0, i + 1, free, 'sharing'} end
      if f[2] ~= 'online' then return {0, i + 1, free} end
      if redis.call('EXISTS', KEYS[k + 5 + 3 * i]) == 1 then return {0, i + 1, free} end
      if shares then
        if not devs[pool] then devs[pool] = cb_read_devices(pool) end
        local wholes = free - (demand[pool] or 0)
        local chosen = cb_pick_devices(devs[pool], tonumber(sf[2]) or 0, tonumber(sf[1]) or 8, units, milli,
          cb_split_devices(hint), wholes)
        if not chosen then  -- with the devices as they are: the broker's engine follows them
          local now, all = cb_read_devices(pool), {}
          for d = 0, (tonumber(sf[2]) or 0) - 1 do all[d + 1] = now[d] or 0 end
          return {0, i + 1, free, '', all}
        end
        for _, d in ipairs(chosen) do
          if devs[pool][d] >= CB_MILLI then demand[pool] = (demand[pool] or 0) + 1 end
          devs[pool][d] = devs[pool][d] - milli
        end
        picked[i] = chosen
      else
        demand[pool] = (demand[pool] or 0) + units  -- one pool named twice: the sum
        if free < demand[pool] then return {0, i + 1, free} end
      end
    elseif shares then
      picked[i] = cb_split_devices(hint)  -- a lease put back takes the devices it held
    end
  end
  local out = {1}
  for i = 0, n - 1 do
    local pool, leases, lease = KEYS[k + 3 + 3 * i], KEYS[k + 4 + 3 * i], KEYS[k + 5 + 3 * i]
    local lease_id, units, interruptible = ARGV[a + 3 + 7 * i], tonumber(ARGV[a + 4 + 7 * i]), ARGV[a + 6 + 7 * i]
    local milli, info = tonumber(ARGV[a + 8 + 7 * i]), ARGV[a + 5 + 7 * i]
    if held[i] and picked[i] then
      local after = cb_take_devices(pool, picked[i], milli)
      out[#out + 1] = {cb_recompute(pool)[2], picked[i], after}
      info = cb_with_devices(info, picked[i])
      redis.call('HSET', lease, 'milli', milli, 'devices', table.concat(picked[i], ','))
    elseif held[i] then
      redis.call('HINCRBY', pool, 'leased', units)
      out[#out + 1] = cb_recompute(pool)[2]
    else
      out[#out + 1] = 0
    end
    redis.call('HSET', lease, 'info', info, 'units', units, 'expires', expires, 'seq', 1,
      'interruptible', interruptible, 'pool', pool, 'generation', gens[i])
    redis.call('SADD', leases, lease_id)
    if mode == 'check' then redis.call('HSET', lease, 'pending', 1) end
    if interruptible == '1' then redis.call('SADD', KEYS[k + 2], lease_id) end
    redis.call('ZADD', KEYS[k], expires, lease_id)
  end
  return out
end

local replies, k, a = {}, 1, 2
for g = 1, tonumber(ARGV[1]) do
  local n = tonumber(ARGV[a + 2])
  replies[g] = reserve(k, a)
  k, a = k + 3 + 3 * n, a + 3 + 7 * n
end
return replies
