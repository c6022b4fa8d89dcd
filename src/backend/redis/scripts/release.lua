-- Releases one connection reservation of a user (see reserve.lua).
-- KEYS: the user's conns hash.
-- ARGV: this node's incarnation ("<node>|<boot>"), the hash's lifetime
--       (ms, --presence-ttl), set again (a hash left empty is gone).
-- Returns the incarnation's remaining reservations for the user.
local n = redis.call('HINCRBY', KEYS[1], ARGV[1], -1)
if n <= 0 then
  redis.call('HDEL', KEYS[1], ARGV[1])
  n = 0
end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return n
