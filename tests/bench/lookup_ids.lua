-- wrk script: GET <BENCH_PREFIX><string.format(BENCH_PATTERN, i)> for i = 0 .. BENCH_IDS-1 in
-- turn, so a lookup route resolves many ids. Every request string is built once in init():
-- the plain route (BENCH_IDS=1, a fixed path) costs wrk exactly what a lookup route costs.
local prefix = os.getenv("BENCH_PREFIX") or "/media/"
local pattern = os.getenv("BENCH_PATTERN") or "4k.bin"
local count = tonumber(os.getenv("BENCH_IDS") or "1")
local requests, i = {}, 0

function init(args) -- in the thread's Lua state, after wrk set the Host header
  for k = 0, count - 1 do
    requests[k + 1] = wrk.format("GET", prefix .. string.format(pattern, k))
  end
end

function request()
  i = i % count + 1
  return requests[i]
end
