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
