-- Request: placed → replacing. One lease of the request ended failed or lost (the
-- failover consumer delivers its event to one broker replica, and again after a crash):
-- the replica claims the request for that lease's replacement. Exactly once per lease:
-- a lease whose outcome is recorded (`ended:<lease id>`) is answered with that outcome,
-- never replaced twice. A claim whose expiry passed (its claimer died or stalled) is
-- taken over; a live claim (this lease's or another's) makes the caller retry later.
-- KEYS[1] the request hash
-- ARGV[1] the lease id, ARGV[2] claim token, ARGV[3] now (epoch s), ARGV[4] the claim's expiry
-- Reply: {1, record json} claimed; {2, outcome json} handled before; {3, state} the
--   request does not hold that lease (nothing to replace); {0, state} busy: retry later
local done = redis.call('HGET', KEYS[1], 'ended:' .. ARGV[1])
if done then return {2, done} end
local f = redis.call('HMGET', KEYS[1], 'state', 'claim_until', 'record')
local state = f[1]
if not state then return {3, ''} end
if state == 'replacing' then
  if tonumber(f[2]) > tonumber(ARGV[3]) then return {0, state} end
elseif state == 'queued' or state == 'placing' then
  return {0, state}  -- another of its leases waits for a replacement: this one comes after
elseif state ~= 'placed' then
  return {3, state}  -- rejected, cancelled, expired, failed: it holds nothing to replace
end
local held = false
for _, id in ipairs(cjson.decode(f[3])['lease_ids'] or {}) do
  if id == ARGV[1] then held = true end
end
if not held then
  if state == 'replacing' then return {0, state} end  -- the abandoned claim is another lease's
  return {3, state}
end
redis.call('HSET', KEYS[1], 'state', 'replacing', 'claim', ARGV[2], 'claim_until', ARGV[4], 'replacing', ARGV[1])
return {1, f[3]}
