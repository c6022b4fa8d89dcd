-- Deletes stored messages, by id or all of them (the message center).
-- KEYS: inbox, meta, rd, ur, del (see prelude.lua).
-- ARGV: now (ms), max_age (ms), ttl (ms), channel, all ('1' or '0'),
--       id1, id2, ...
-- A deleted message is gone for every device: never listed, replayed or
-- counted again. Deleting does not raise the floor (a resume after it is
-- still complete: the deleted messages are simply not there). Ids no
-- longer stored are skipped. When something was deleted, publishes the
-- new count (`u<n>`, when it changed) and the change (`s` + a "changed"
-- frame) on the user's channel, in the same atomic step.
-- Returns {unread, deleted id1, deleted id2, ...}; with all, {unread,
-- number deleted}.
if redis.call('EXISTS', KEYS[2]) == 0 then
  if ARGV[5] == '1' then return {0, 0} end
  return {0}
end
trim(KEYS[1], KEYS[2], tonumber(ARGV[1]), tonumber(ARGV[2]), nil)
-- Inboxes from before per-message state get their tn written down first:
-- the fallback (seq - XLEN) holds only while nothing was deleted.
local tn = trimmed(KEYS[1], KEYS[2])
redis.call('HSET', KEYS[2], 'tn', tn)
local before = unread(KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5])
local seq = tonumber(redis.call('HGET', KEYS[2], 'seq') or '0')
if ARGV[5] == '1' then
  local n = redis.call('XLEN', KEYS[1])
  redis.call('XTRIM', KEYS[1], 'MAXLEN', 0)
  redis.call('HSET', KEYS[2], 'tn', seq)
  redis.call('DEL', KEYS[3], KEYS[4], KEYS[5])
  if n > 0 then
    touch(KEYS, ARGV[3])
    announce(ARGV[4], before, 0, changed_frame('delete', nil, '"all":true,', 0))
  end
  return {0, n}
end
local done = {}
for i = 6, #ARGV do
  local id = ARGV[i]
  local e = entry(KEYS[1], id)
  if e then
    local n = tonumber(e[2][2])
    redis.call('XDEL', KEYS[1], id)
    redis.call('ZADD', KEYS[5], n, id)
    redis.call('ZREM', KEYS[3], id)
    redis.call('ZREM', KEYS[4], id)
    done[#done + 1] = id
  end
end
if #done > 0 then
  -- Everything below the oldest message kept is gone now.
  local first = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', 1)[1]
  local t = seq
  if first then t = tonumber(first[2][2]) - 1 end
  if t > tn then
    redis.call('HSET', KEYS[2], 'tn', t)
    prune(KEYS[3], KEYS[4], KEYS[5], t)
  end
end
local after = unread(KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5])
if #done > 0 then
  touch(KEYS, ARGV[3])
  announce(ARGV[4], before, after, changed_frame('delete', done, '', after))
end
local out = {after}
for _, id in ipairs(done) do out[#out + 1] = id end
return out
