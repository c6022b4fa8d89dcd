-- Stores one message for a user and publishes it to the user's channel.
-- KEYS: inbox, meta[, idempotency record].
-- ARGV: now (ms), frame head, frame tail, max_len, max_age (ms), ttl (ms),
--       channel[, fingerprint, window (ms)].
-- With a record key: if the record exists, nothing is stored or published
-- and the record's answer is returned (or a conflict when it was written
-- for another fingerprint); otherwise the record is written with the answer.
-- Assigns the id, stores the frame (head .. id .. tail), trims, publishes
-- `m<id> <frame>` (the stored-message payload of codec.rs) with PUBLISH
-- (scripts.rs defines it: 'PUBLISH', or 'SPUBLISH' on a cluster).
-- Returns {id, number of nodes that received the publish, replayed 0|1},
-- or {'', 0, 2} for a key reused with another request.
if KEYS[3] then
  local seen = redis.call('GET', KEYS[3])
  if seen then
    local rid, online, fp = string.match(seen, '^(%S+) (%d) (%S+)$')
    if fp ~= ARGV[8] then return {'', 0, 2} end
    return {rid, tonumber(online), 1}
  end
end
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
local receivers = redis.call(PUBLISH, ARGV[7], 'm' .. id .. ' ' .. frame)
if KEYS[3] then
  local online = 0
  if receivers > 0 then online = 1 end
  redis.call('SET', KEYS[3], id .. ' ' .. online .. ' ' .. ARGV[8], 'PX', ARGV[9])
end
return {id, receivers, 0}
