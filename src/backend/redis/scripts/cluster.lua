-- Every live node and the distinct users online across them, from the
-- nodes' presence hashes (exact, O(online users): an ops call).
-- KEYS: nodes.
-- ARGV: conns prefix, conns suffix (a node's hash is prefix .. id .. suffix),
--       stats suffix (a node's stats hash is prefix .. id .. stats suffix).
-- Returns {online users, node1, connections1, users1, started1 (unix ms or
--          0), delivered1, events1, node2, ...}.
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local live = redis.call('ZRANGEBYSCORE', KEYS[1], now, '+inf')
local seen, online, out = {}, 0, {0}
for _, node in ipairs(live) do
  local kv = redis.call('HGETALL', ARGV[1] .. node .. ARGV[2])
  local conns = 0
  for i = 1, #kv, 2 do
    conns = conns + tonumber(kv[i + 1])
    if not seen[kv[i]] then seen[kv[i]] = true online = online + 1 end
  end
  out[#out + 1] = node
  out[#out + 1] = conns
  out[#out + 1] = #kv / 2
  local st = redis.call('HMGET', ARGV[1] .. node .. ARGV[3], 'started', 'delivered', 'events')
  for _, v in ipairs(st) do out[#out + 1] = tonumber(v or '0') end
end
out[1] = online
return out
