-- Stores one message for a user and publishes it to the user's channel.
-- KEYS: inbox, meta[, idempotency record].
-- ARGV: now (ms), frame head, frame tail, max_len, max_age (ms), ttl (ms),
--       channel[, fingerprint, window (ms)].
-- With a record key: if the record exists, nothing is stored or published
-- and the record's answer is returned (or a conflict when it was written
-- for another fingerprint); otherwise the record is written with the answer.
-- Assigns the id, stores the frame (head .. id .. tail), trims when
-- something may be due, refreshes the keys' expiry (see lifetime in
-- prelude.lua), publishes
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
-- The common case is four commands: HMGET, XADD, HSET, PUBLISH. Each
-- redis.call costs a few microseconds of Redis CPU whatever it does, so
-- what can be skipped safely is: the trim unless something may be due
-- (`ok`: no kept message is older than this id; the count is at most
-- n - tn), and the expiry refresh within `slack` of the last one (`px`).
local fields = {'last', 'seq', 'tn', 'ok', 'px'}
local m = redis.call('HMGET', KEYS[2], unpack(fields))
if not m[1] then
  ensure(KEYS[2], now)
  m = redis.call('HMGET', KEYS[2], unpack(fields))
end
local lms, lseq = parse(m[1])
-- Numbers handed to redis.call are printed with snprintf("%.17g") by
-- Redis (slow); strings from ARGV and replies are passed as they are.
local id
if now > lms then id = ARGV[1] .. '-0' else id = fmt(lms, lseq + 1) end
local frame = ARGV[2] .. id .. ARGV[3]
local seq = tonumber(m[2]) + 1
local n = tostring(seq)
redis.call('XADD', KEYS[1], id, 'n', n, 'f', frame)
local ttl, px = tonumber(ARGV[6]), tonumber(m[5])
if px and now >= px and now - px < slack(ttl) then
  redis.call('HSET', KEYS[2], 'last', id, 'seq', n)
else
  redis.call('HSET', KEYS[2], 'last', id, 'seq', n, 'px', ARGV[1])
  redis.call('PEXPIRE', KEYS[1], lifetime(ttl))
  redis.call('PEXPIRE', KEYS[2], lifetime(ttl))
end
local max_age = tonumber(ARGV[5])
local ok, tn = m[4], tonumber(m[3])
if (not ok) or (not tn) or seq - tn > tonumber(ARGV[4]) or parse(ok) < now - max_age then
  redis.call('HSET', KEYS[2], 'ok', trim(KEYS[1], KEYS[2], now, max_age, ARGV[4]) or id)
end
local receivers = redis.call(PUBLISH, ARGV[7], 'm' .. id .. ' ' .. frame)
if KEYS[3] then
  local online = 0
  if receivers > 0 then online = 1 end
  redis.call('SET', KEYS[3], id .. ' ' .. online .. ' ' .. ARGV[8], 'PX', ARGV[9])
end
return {id, receivers, 0}
