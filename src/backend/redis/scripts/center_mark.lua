-- Marks stored messages read or unread, by id (the message center).
-- KEYS: inbox, meta, rd, ur, del (see prelude.lua).
-- ARGV: now (ms), max_age (ms), ttl (ms), channel, op ('read' or
--       'unread'), id1, id2, ...
-- Ids no longer stored (deleted, trimmed, never) are skipped, and so are
-- messages already in that state. When something changed, publishes the
-- new count (`u<n>`, when it changed) and the change (`s` + a "changed"
-- frame naming the ids that changed) on the user's channel, in the same
-- atomic step, so every device sees changes in the order they happened.
-- Returns {unread, changed id1, changed id2, ...}.
if redis.call('EXISTS', KEYS[2]) == 0 then return {0} end
trim(KEYS[1], KEYS[2], tonumber(ARGV[1]), tonumber(ARGV[2]), nil)
local before = unread(KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5])
local rn = tonumber(redis.call('HGET', KEYS[2], 'rn') or '0')
local read = ARGV[5] == 'read'
local done = {}
for i = 6, #ARGV do
  local id = ARGV[i]
  local e = entry(KEYS[1], id)
  if e then
    local n = tonumber(e[2][2])
    local c
    if n <= rn then
      -- At or below the cursor: read unless listed in ur.
      if read then c = redis.call('ZREM', KEYS[4], id) else c = redis.call('ZADD', KEYS[4], n, id) end
    else
      -- Above the cursor: unread unless listed in rd.
      if read then c = redis.call('ZADD', KEYS[3], n, id) else c = redis.call('ZREM', KEYS[3], id) end
    end
    if c == 1 then done[#done + 1] = id end
  end
end
local after = unread(KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5])
if #done > 0 then
  touch(KEYS, ARGV[3])
  announce(ARGV[4], before, after, changed_frame(ARGV[5], done, '', after))
end
local out = {after}
for _, id in ipairs(done) do out[#out + 1] = id end
return out
