-- Renews this node's lease (Redis clock) and forgets nodes dead for a
-- minute.
-- KEYS: nodes, this node's conns hash, boots, this node's stats hash.
-- ARGV: node id, lease (ms), boot id of this incarnation, started (unix
--       ms), messages delivered, broker events received.
-- Returns Redis's clock (ms).
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local lease = tonumber(ARGV[2])
redis.call('ZADD', KEYS[1], now + lease, ARGV[1])
redis.call('HSET', KEYS[3], ARGV[1], ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - 60000)
redis.call('PEXPIRE', KEYS[2], lease * 3)
redis.call('HSET', KEYS[4], 'started', ARGV[4], 'delivered', ARGV[5], 'events', ARGV[6])
redis.call('PEXPIRE', KEYS[4], lease * 3)
return now
