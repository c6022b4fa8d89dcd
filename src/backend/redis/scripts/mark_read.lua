-- Moves the read cursor to up_to (never backwards, never past the newest).
-- KEYS: inbox, meta.
-- ARGV: now (ms), max_age (ms), up_to (an id, '' for the newest message).
-- Returns {unread, changed (0/1)}.
if redis.call('EXISTS', KEYS[2]) == 0 then return {0, 0} end
trim(KEYS[1], KEYS[2], tonumber(ARGV[1]), tonumber(ARGV[2]), nil)
local before = unread(KEYS[1], KEYS[2])
local last = redis.call('HGET', KEYS[2], 'last')
local target = ARGV[3]
if target == '' or lt(last, target) then target = last end
if not lt(redis.call('HGET', KEYS[2], 'rid'), target) then return {before, 0} end
local e = redis.call('XREVRANGE', KEYS[1], target, '-', 'COUNT', 1)
if #e > 0 then
  local n = tonumber(e[1][2][2])
  if n > tonumber(redis.call('HGET', KEYS[2], 'rn')) then redis.call('HSET', KEYS[2], 'rn', n) end
end
redis.call('HSET', KEYS[2], 'rid', target)
local after = unread(KEYS[1], KEYS[2])
if after ~= before then return {after, 1} end
return {after, 0}
