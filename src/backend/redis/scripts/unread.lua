-- The user's unread count.
-- KEYS: inbox, meta, rd, ur, del (see prelude.lua).
-- ARGV: now (ms), max_age (ms).
-- Returns the count (0 for a user with no inbox).
if redis.call('EXISTS', KEYS[2]) == 0 then return 0 end
trim(KEYS[1], KEYS[2], tonumber(ARGV[1]), tonumber(ARGV[2]), nil)
return unread(KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5])
