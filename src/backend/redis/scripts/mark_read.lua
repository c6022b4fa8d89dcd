-- Moves the read cursor to up_to (never backwards, never past the newest)
-- and marks every message at or below up_to read (those marked unread one
-- by one below the cursor too).
-- KEYS: inbox, meta, rd, ur, del (see prelude.lua).
-- ARGV: now (ms), max_age (ms), up_to (an id, '' for the newest message),
--       ttl (ms), channel.
-- When the count changed, publishes it (`u<n>`) and the change (`s` + a
-- "changed" frame with up_to) on the user's channel in the same atomic
-- step.
-- Returns {unread, changed (0/1)}.
if redis.call('EXISTS', KEYS[2]) == 0 then return {0, 0} end
trim(KEYS[1], KEYS[2], tonumber(ARGV[1]), tonumber(ARGV[2]), nil)
local before = unread(KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5])
local last = redis.call('HGET', KEYS[2], 'last')
local target = ARGV[3]
if target == '' or lt(last, target) then target = last end
-- The ordinal of the newest message kept at or below target.
local e = redis.call('XREVRANGE', KEYS[1], target, '-', 'COUNT', 1)
local tnum = nil
if #e > 0 then tnum = tonumber(e[1][2][2]) end
if lt(redis.call('HGET', KEYS[2], 'rid'), target) then
  if tnum and tnum > tonumber(redis.call('HGET', KEYS[2], 'rn')) then
    redis.call('HSET', KEYS[2], 'rn', tnum)
  end
  redis.call('HSET', KEYS[2], 'rid', target)
end
if tnum then
  -- Read ids now at or below the cursor need no entry; unread ones at or
  -- below target become read.
  local rn = redis.call('HGET', KEYS[2], 'rn')
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', rn)
  redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', string.format('%.0f', tnum))
end
local after = unread(KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5])
if after ~= before then
  announce(ARGV[5], before, after, changed_frame('read', nil, '"up_to":"' .. target .. '",', after))
  return {after, 1}
end
return {after, 0}
