-- Stores one message for a user and publishes it to the user's channel.
-- KEYS: inbox, meta.
-- ARGV: now (ms), frame head, frame tail, max_len, max_age (ms), ttl (ms),
--       channel.
-- Assigns the id, stores the frame (head .. id .. tail), trims, publishes
-- `m<id> <frame>` (the stored-message payload of codec.rs).
-- Returns {id, number of nodes that received the publish}.
local now = tonumber(ARGV[1])
ensure(KEYS[2], now)
local lms, lseq = parse(redis.call('HGET', KEYS[2], 'last'))
local id
if now > lms then id = fmt(now, 0) else id = fmt(lms, lseq + 1) end
local frame = ARGV[2] .. id .. ARGV[3]
local n = redis.call('HINCRBY', KEYS[2], 'seq', 1)
redis.call('XADD', KEYS[1], id, 'n', n, 'f', frame)
redis.call('HSET', KEYS[2], 'last', id)
trim(KEYS[1], KEYS[2], now, tonumber(ARGV[5]), ARGV[4])
redis.call('PEXPIRE', KEYS[1], ARGV[6])
redis.call('PEXPIRE', KEYS[2], ARGV[6])
local receivers = redis.call('PUBLISH', ARGV[7], 'm' .. id .. ' ' .. frame)
return {id, receivers}
