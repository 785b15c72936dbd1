-- Free capacity of the pools that share devices (docs/sharing.md), inside Redis: for each
-- pool whose per-device hash exists, how much of its free capacity is whole devices and
-- how much is left over on devices partly taken (fragmented). KEYS: the pool hashes of a
-- region, then their per-device hashes in the same order (one hash slot).
-- Reply: {index, model, status, devices, whole, fragmented devices, fragmented milli,
-- largest slice} per sharing pool (index: 1-based position of its pool in KEYS). Devices
-- at or past the pool's capacity (it shrank under a lease: they stay until it ends) offer
-- nothing and are not counted.
local n = #KEYS / 2
local out = {}
for i = 1, n do
  local dev = KEYS[n + i]
  if redis.call('EXISTS', dev) == 1 then
    local v = redis.call('HMGET', KEYS[i], 'model', 'status', 'capacity')
    local capacity = tonumber(v[3]) or 0
    local flat = redis.call('HGETALL', dev)
    local devices, whole, frag, milli, largest = 0, 0, 0, 0, 0
    for j = 2, #flat, 2 do
      if (tonumber(flat[j - 1]) or capacity) < capacity then
        local free = tonumber(flat[j]) or 0
        devices = devices + 1
        if free >= 1000 then
          whole = whole + 1
        elseif free > 0 then
          frag = frag + 1
          milli = milli + free
          if free > largest then largest = free end
        end
      end
    end
    out[#out + 1] = {i, v[1] or '', v[2] or '', devices, whole, frag, milli, largest}
  end
end
return out
