-- Shared by every script that changes a pool's hash (registry and broker): the one
-- definition of a pool's live numbers. Prepended to those scripts at load time.
--   free       = max(0, effective - leased) while online, else 0
--   overcommit = max(0, leased - effective)
--   effective  = min(capacity, healthy) when a heartbeat reported healthy units
local function cb_status_of(alive, draining)
  if alive ~= 1 then return 'offline' end
  if draining == 1 then return 'draining' end
  return 'online'
end

local function cb_recompute(pool)
  local f = redis.call('HMGET', pool, 'capacity', 'healthy', 'leased', 'alive', 'draining')
  local capacity, healthy, leased = tonumber(f[1]) or 0, tonumber(f[2]) or -1, tonumber(f[3]) or 0
  local alive, draining = tonumber(f[4]) or 0, tonumber(f[5]) or 0
  local effective = capacity
  if healthy >= 0 and healthy < capacity then effective = healthy end
  local status = cb_status_of(alive, draining)
  local free = 0
  if status == 'online' then free = math.max(0, effective - leased) end
  local over = math.max(0, leased - effective)
  redis.call('HSET', pool, 'status', status, 'free', free, 'overcommit', over)
  return {status, free, over, leased, capacity}
end

-- Whether a lease of generation ``a`` belongs to the pool hash of generation ``b``: a
-- generation is one registration of a pool id, from creation to removal. 0 is a lease or
-- hash written before generations were recorded, which matches any (an upgrade in place).
local function cb_same_generation(a, b)
  return a == 0 or b == 0 or a == b
end

-- Shares (docs/sharing.md). A pool that shares its devices keeps free milli per device
-- in the hash beside its own (Keys.pool_devices: the pool key + ':dev', same hash slot).
-- Its ``leased`` counts the devices with any milli taken, so ``free`` above counts the
-- devices with all 1000 free and every whole-unit path reads the same numbers.
local CB_MILLI = 1000

local function cb_devices_key(pool)
  return pool .. ':dev'
end

-- '3,4' -> {3, 4}; '', '-1' -> {} (no device named)
local function cb_split_devices(s)
  local out = {}
  for d in string.gmatch(s or '', '-?%d+') do
    if tonumber(d) >= 0 then out[#out + 1] = tonumber(d) end
  end
  return out
end

-- Take ``milli`` on each of ``devices`` (no checks: the caller checked, or restores a
-- lease granted when it fitted; never below 0). Returns the free milli after, per device.
local function cb_take_devices(pool, devices, milli)
  local dev, touched, out = cb_devices_key(pool), 0, {}
  for i, d in ipairs(devices) do
    local free = tonumber(redis.call('HGET', dev, d)) or CB_MILLI
    local after = math.max(0, free - milli)
    if free >= CB_MILLI and after < CB_MILLI then touched = touched + 1 end
    redis.call('HSET', dev, d, after)
    out[i] = after
  end
  if touched > 0 then redis.call('HINCRBY', pool, 'leased', touched) end
  return out
end

-- Give ``milli`` back on each of ``devices`` (never above 1000). A device past the pool's
-- capacity (the pool shrank under a lease) leaves the hash once all of it is free.
-- Returns the free milli after, per device (-1: the device is not there).
local function cb_give_devices(pool, devices, milli)
  local dev, freed, out = cb_devices_key(pool), 0, {}
  local capacity = tonumber(redis.call('HGET', pool, 'capacity')) or 0
  for i, d in ipairs(devices) do
    local free = tonumber(redis.call('HGET', dev, d))
    if free == nil then
      out[i] = -1
    else
      local after = math.min(CB_MILLI, free + milli)
      if free < CB_MILLI and after >= CB_MILLI then freed = freed + 1 end
      if after >= CB_MILLI and d >= capacity then redis.call('HDEL', dev, d) else redis.call('HSET', dev, d, after) end
      out[i] = after
    end
  end
  if freed > 0 then
    local leased = tonumber(redis.call('HGET', pool, 'leased')) or 0
    redis.call('HSET', pool, 'leased', math.max(0, leased - freed))
  end
  return out
end

-- A sharing pool's devices as a table: index -> free milli.
local function cb_read_devices(pool)
  local all, out = redis.call('HGETALL', cb_devices_key(pool)), {}
  for i = 1, #all, 2 do out[tonumber(all[i])] = tonumber(all[i + 1]) end
  return out
end

-- The lease json (msgspec's encoding of LeaseInfo, ``devices`` empty) naming ``devices``.
local function cb_with_devices(info, devices)
  return (string.gsub(info, '"devices":%[%]', '"devices":[' .. table.concat(devices, ',') .. ']', 1))
end

local function cb_whole_per_node(devs, capacity, upn)
  local counts = {}
  for d = 0, capacity - 1 do
    if (devs[d] or 0) >= CB_MILLI then
      local node = math.floor(d / upn)
      counts[node] = (counts[node] or 0) + 1
    end
  end
  return counts
end

local function cb_whole_hint_fits(devs, capacity, upn, units, hint)
  if #hint ~= units then return false end
  local seen = {}
  for _, d in ipairs(hint) do
    if seen[d] or d >= capacity or (devs[d] or 0) < CB_MILLI then return false end
    if units <= upn and math.floor(d / upn) ~= math.floor(hint[1] / upn) then return false end
    seen[d] = true
  end
  return true
end

-- The devices for ``units`` x ``milli`` on a sharing pool (``devs`` from cb_read_devices;
-- ``wholes`` = wholly free devices the pool may still give, after its healthy units and
-- this call's earlier picks), or nil when nothing fits. The rule is in lua/reserve.lua.
local function cb_pick_devices(devs, capacity, upn, units, milli, hint, wholes)
  if upn < 1 then upn = 1 end
  if milli < CB_MILLI then
    if units ~= 1 then return nil end
    local h = hint[1]
    if #hint == 1 and h < capacity and (devs[h] or 0) >= milli and (devs[h] < CB_MILLI or wholes >= 1) then
      return {h}
    end
    local best, best_free = nil, CB_MILLI
    for d = 0, capacity - 1 do
      local f = devs[d] or 0
      if f >= milli and f < best_free then best, best_free = d, f end
    end
    if best then return {best} end
    if wholes < 1 then return nil end
    local counts, best_count = cb_whole_per_node(devs, capacity, upn), nil
    for d = 0, capacity - 1 do
      if (devs[d] or 0) >= CB_MILLI then
        local c = counts[math.floor(d / upn)]
        if best_count == nil or c < best_count then best, best_count = d, c end
      end
    end
    if best then return {best} end
    return nil
  end
  if units > wholes then return nil end
  if cb_whole_hint_fits(devs, capacity, upn, units, hint) then return hint end
  local counts = cb_whole_per_node(devs, capacity, upn)
  local nodes = {}
  for node, c in pairs(counts) do nodes[#nodes + 1] = {node, c} end
  local out = {}
  if units <= upn then
    local best = nil
    for _, e in ipairs(nodes) do
      if e[2] >= units and (best == nil or e[2] < best[2] or (e[2] == best[2] and e[1] < best[1])) then best = e end
    end
    if not best then return nil end
    for d = best[1] * upn, math.min(capacity, (best[1] + 1) * upn) - 1 do
      if #out < units and (devs[d] or 0) >= CB_MILLI then out[#out + 1] = d end
    end
    return out
  end
  table.sort(nodes, function(x, y) return x[2] > y[2] or (x[2] == y[2] and x[1] < y[1]) end)
  for _, e in ipairs(nodes) do
    for d = e[1] * upn, math.min(capacity, (e[1] + 1) * upn) - 1 do
      if #out < units and (devs[d] or 0) >= CB_MILLI then out[#out + 1] = d end
    end
  end
  if #out < units then return nil end
  return out
end
