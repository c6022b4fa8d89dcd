-- Connections per user, summed over nodes whose lease is live (Redis clock).
-- KEYS: nodes.
-- ARGV: conns prefix, conns suffix (a node's hash is prefix .. id .. suffix),
--       user1, user2, ...
-- Returns {count1, count2, ...} in ARGV order.
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local live = redis.call('ZRANGEBYSCORE', KEYS[1], now, '+inf')
local counts = {}
for i = 3, #ARGV do counts[i - 2] = 0 end
if #ARGV < 3 then return counts end
for _, node in ipairs(live) do
  local vals = redis.call('HMGET', ARGV[1] .. node .. ARGV[2], unpack(ARGV, 3))
  for i, v in ipairs(vals) do if v then counts[i] = counts[i] + tonumber(v) end end
end
return counts
