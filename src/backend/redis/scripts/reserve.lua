-- Reserves one connection of a user, cluster-wide, within a cap: the
-- check and the increment are one atomic step, so concurrent connects on
-- any nodes can never exceed the cap. Touches the user's hash only (one
-- slot): which node incarnations are alive comes from the caller's cache
-- of the node leases (leases.rs).
-- KEYS: the user's conns hash.
-- ARGV: this node's incarnation ("<node>|<boot>"), cap, the hash's
--       lifetime (ms, --presence-ttl), n, then n live incarnations, then
--       the lapsed ones (current boot, lease run out).
-- Counts this incarnation, the live ones and any the caller did not name
-- (a node too new for its cache: counted, so the cap holds); lapsed ones
-- are kept but not counted. A reservation sets the hash's expiry (the
-- registrar of each node holding the user refreshes it), so what a
-- crashed node left does not stay forever.
-- Returns {1, count with this one, unnamed...} when reserved,
--         {0, count, unnamed...} when full.
local n = tonumber(ARGV[4])
local live, lapsed = {}, {}
for i = 5, 4 + n do live[ARGV[i]] = true end
for i = 5 + n, #ARGV do lapsed[ARGV[i]] = true end
local kv = redis.call('HGETALL', KEYS[1])
local total, unnamed = 0, {}
for i = 1, #kv, 2 do
  local field, c = kv[i], tonumber(kv[i + 1])
  if field == ARGV[1] or live[field] then
    total = total + c
  elseif not lapsed[field] then
    total = total + c
    unnamed[#unnamed + 1] = field
  end
end
local out = {0, total}
if total < tonumber(ARGV[2]) then
  redis.call('HINCRBY', KEYS[1], ARGV[1], 1)
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
  out = {1, total + 1}
end
for _, f in ipairs(unnamed) do out[#out + 1] = f end
return out
