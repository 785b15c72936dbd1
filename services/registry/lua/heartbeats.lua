-- Heartbeats of many pools of one region in one call: for each, exactly what pool.lua's
-- 'heartbeat' op does (and replies), in order. One call instead of one per pool: the
-- registry's client spent ~47 us of CPU per heartbeat on per-command overhead, in bursts
-- that took the cores a broker on the same machine was placing with (docs/benchmarks.md,
-- session 10). The caller keeps each call to a bounded number of pools, so that no call
-- holds Redis for long.
--
-- KEYS[1] the region's heartbeat zset, then KEYS[1 + i] the hash of pool i (one region:
-- one hash slot on Redis Cluster)
-- ARGV[1] now (unix seconds), then for pool i: ARGV[2 + 3(i-1)] pool id,
--   ARGV[3 + 3(i-1)] provider ("" = any), ARGV[4 + 3(i-1)] healthy units (-2: not said)
-- Reply: one pool.lua reply per pool, {code, prev_status, status, free, overcommit,
--   leased, capacity, generation, {}, 0}; code 1 ok, 0 not found, -1 another provider's
local hb, now = KEYS[1], tonumber(ARGV[1])
local out = {}
for i = 1, #KEYS - 1 do
  local pool = KEYS[1 + i]
  local base = 2 + 3 * (i - 1)
  local pool_id, provider, healthy = ARGV[base], ARGV[base + 1], tonumber(ARGV[base + 2])
  if redis.call('EXISTS', pool) == 0 then
    out[i] = {0, 'absent', 'absent', 0, 0, 0, 0, 0, {}, 0}
  else
    local prev = redis.call('HGET', pool, 'status') or 'offline'
    if provider ~= '' and redis.call('HGET', pool, 'provider') ~= provider then
      out[i] = {-1, prev, prev, 0, 0, 0, 0, 0, {}, 0}
    else
      if healthy ~= -2 then redis.call('HSET', pool, 'healthy', healthy) end
      redis.call('HSET', pool, 'alive', 1, 'last_hb', now)
      redis.call('ZADD', hb, now, pool_id)
      local r = cb_recompute(pool)
      out[i] = {1, prev, r[1], r[2], r[3], r[4], r[5], tonumber(redis.call('HGET', pool, 'generation')) or 0, {}, 0}
    end
  end
end
return out
