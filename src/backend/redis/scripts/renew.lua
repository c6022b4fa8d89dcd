-- Renews this node's lease (Redis clock), forgets nodes dead for a minute,
-- and returns every node's lease; with an empty node id, only reads them.
-- One key, so it runs unchanged on Redis Cluster (the registrar writes the
-- node's other keys with plain commands beside it).
-- KEYS: nodes.
-- ARGV: node id ('' to only read), lease (ms).
-- Returns {Redis's clock (ms), node1, expiry1, node2, expiry2, ...}.
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
if ARGV[1] ~= '' then
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - 60000)
end
local out = {now}
local all = redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES')
for i = 1, #all, 2 do
  out[#out + 1] = all[i]
  out[#out + 1] = math.floor(tonumber(all[i + 1]))
end
return out
