-- wrk script: each request asks for a random 1 MiB range of a BENCH_SIZE-byte file
-- (`Range: bytes=o-(o+1048575)`), half of them at a 4 KiB-aligned offset, half at any byte.
local size = tonumber(os.getenv("BENCH_SIZE") or "67108864")
local span = 1048576
local threads = 0

function setup(thread) -- runs in the main Lua state, once per wrk thread
  threads = threads + 1
  thread:set("thread_id", threads)
end

function init(args) -- runs in each thread's own Lua state: seed its generator
  math.randomseed(os.time() * 1000 + (thread_id or 0) * 7919)
end

function request()
  local first = math.random(0, size - span)
  if math.random() < 0.5 then
    first = first - first % 4096
  end
  return wrk.format("GET", nil, { ["Range"] = "bytes=" .. first .. "-" .. (first + span - 1) })
end
