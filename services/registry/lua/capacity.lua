-- Sum a region's pools by accelerator model, inside Redis: one round trip and a small
-- reply instead of one HMGET per pool. KEYS: the region's pool hashes (one hash slot).
-- Reply: {model, pools, online, capacity, leased, free} per model.
local agg, order = {}, {}
for _, key in ipairs(KEYS) do
  local v = redis.call('HMGET', key, 'model', 'capacity', 'leased', 'free', 'status')
  if v[1] then
    local a = agg[v[1]]
    if not a then
      a = {0, 0, 0, 0, 0}
      agg[v[1]] = a
      order[#order + 1] = v[1]
    end
    a[1] = a[1] + 1
    if v[5] == 'online' then a[2] = a[2] + 1 end
    a[3] = a[3] + (tonumber(v[2]) or 0)
    a[4] = a[4] + (tonumber(v[3]) or 0)
    a[5] = a[5] + (tonumber(v[4]) or 0)
  end
end
local out = {}
for _, m in ipairs(order) do
  local a = agg[m]
  out[#out + 1] = {m, a[1], a[2], a[3], a[4], a[5]}
end
return out
