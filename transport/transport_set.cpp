#include "transport/transport_set.hpp"

#include <algorithm>
#include <atomic>

#include "transport/byte_codec.hpp"

namespace kvflow::transport {

namespace {

constexpr char endpoint_tag[] = "kvflow-set-1";
constexpr char key_tag = 'S';
constexpr std::uint32_t max_members = 16;
constexpr std::uint32_t max_name = 64;
constexpr std::uint32_t max_part = 1u << 16;  // one member's endpoint or key

// One member's part of a described region.
struct region_part {
  std::string member;
  region_desc desc;
};

std::string pack_key(const std::vector<region_part>& parts) {
  std::string out(1, key_tag);
  codec::put(out, static_cast<std::uint32_t>(parts.size()));
  for (const auto& p : parts) {
    codec::put_string(out, p.member);
    codec::put(out, p.desc.id);
    codec::put(out, p.desc.size);
    codec::put(out, p.desc.address);
    codec::put_string(out, p.desc.remote_key);
  }
  return out;
}

result<std::vector<region_part>> unpack_key(const region_desc& d) {
  const auto& k = d.remote_key;
  auto bad = [&] { return status::error("region " + std::to_string(d.id) + ": malformed transport-set key"); };
  if (k.empty() || k[0] != key_tag) return bad();
  std::size_t at = 1;
  std::uint32_t n = 0;
  if (!codec::get(k, at, n) || n > max_members) return bad();
  std::vector<region_part> parts(n);
  for (auto& p : parts)
    if (!codec::get_string(k, at, p.member, max_name) || !codec::get(k, at, p.desc.id) ||
        !codec::get(k, at, p.desc.size) || !codec::get(k, at, p.desc.address) ||
        !codec::get_string(k, at, p.desc.remote_key, max_part))
      return bad();
  if (at != k.size()) return bad();
  return parts;
}

// name -> endpoint, as the peer listed its members.
result<std::vector<std::pair<std::string, std::string>>> unpack_endpoint(const std::string& e) {
  const std::size_t tag = sizeof endpoint_tag;
  auto bad = [] { return status::error("malformed transport-set endpoint"); };
  if (e.size() < tag || std::memcmp(e.data(), endpoint_tag, tag) != 0) return bad();
  std::size_t at = tag;
  std::uint32_t n = 0;
  if (!codec::get(e, at, n) || n > max_members) return bad();
  std::vector<std::pair<std::string, std::string>> out(n);
  for (auto& [name, ep] : out)
    if (!codec::get_string(e, at, name, max_name) || !codec::get_string(e, at, ep, max_part)) return bad();
  if (at != e.size()) return bad();
  return out;
}

}  // namespace

struct transport_set::impl {
  struct local_region {
    std::vector<std::pair<std::size_t, region_desc>> parts;  // (member, what it registered)
    std::uint64_t address = 0, size = 0;
    bool allocated = false;  // allocate_memory made it: its member frees it
  };
  struct route {
    std::size_t member;
    std::uint64_t id;  // the region's id with that member
  };
  struct peer_link {
    std::unordered_map<std::uint64_t, route> routes;  // by the set's region id
    std::vector<std::size_t> members;                 // connected for this peer
  };

  memory_probe probe;
  mutable std::mutex m;  // everything below
  std::vector<std::shared_ptr<transport>> members;  // only appended: regions and routes name them by index
  std::vector<char> ordered;                        // members[i]->query().gpu_ordered, asked once at add
  std::vector<std::size_t> order;                   // of preference
  std::uint64_t next_id = 1;
  std::unordered_map<std::uint64_t, local_region> locals;
  std::unordered_map<std::uint64_t, peer_link> peers;

  region_desc describe(std::uint64_t id, const local_region& r) const {
    std::vector<region_part> parts;
    for (const auto& [mi, d] : r.parts) parts.push_back({members[mi]->name(), d});
    return {id, r.size, r.address, pack_key(parts)};
  }
  std::uint64_t add_local(local_region r) {
    const auto id = next_id++;
    locals.emplace(id, std::move(r));
    return id;
  }
};

transport_set::transport_set(std::vector<std::shared_ptr<transport>> members, memory_probe probe)
    : impl_(std::make_unique<impl>()) {
  impl_->probe = probe ? std::move(probe) : memory_probe([](const void*) { return memory_type::host; });
  for (auto& m : members) add(std::move(m));
}

transport_set::~transport_set() = default;

void transport_set::add(std::shared_ptr<transport> member, bool preferred) {
  if (!member) return;
  std::lock_guard<std::mutex> g(impl_->m);
  for (const auto& m : impl_->members)
    if (std::string(m->name()) == member->name()) return;
  impl_->ordered.push_back(member->query().gpu_ordered ? 1 : 0);
  impl_->members.push_back(std::move(member));
  const auto i = impl_->members.size() - 1;
  impl_->order.insert(preferred ? impl_->order.begin() : impl_->order.end(), i);
}

void transport_set::requery() {
  std::lock_guard<std::mutex> g(impl_->m);
  for (std::size_t i = 0; i < impl_->members.size(); ++i) impl_->ordered[i] = impl_->members[i]->query().gpu_ordered ? 1 : 0;
}

std::shared_ptr<transport> transport_set::member(const std::string& name) const {
  std::lock_guard<std::mutex> g(impl_->m);
  for (const auto& m : impl_->members)
    if (name == m->name()) return m;
  return nullptr;
}

std::string transport_set::endpoint() const {
  std::lock_guard<std::mutex> g(impl_->m);
  std::string out(endpoint_tag, sizeof endpoint_tag);
  codec::put(out, static_cast<std::uint32_t>(impl_->members.size()));
  for (const auto& m : impl_->members) {
    codec::put_string(out, m->name());
    codec::put_string(out, m->endpoint());
  }
  return out;
}

std::vector<memory_type> transport_set::memory_types() const { return query().memory_types; }

capabilities transport_set::query() const {
  std::lock_guard<std::mutex> g(impl_->m);
  capabilities c;
  for (const auto& m : impl_->members) {
    const auto q = m->query();
    for (auto t : q.memory_types)
      if (std::find(c.memory_types.begin(), c.memory_types.end(), t) == c.memory_types.end())
        c.memory_types.push_back(t);
    c.cross_host = c.cross_host || q.cross_host;
    c.gpu_ordered = c.gpu_ordered || q.gpu_ordered;
  }
  return c;
}

bool transport_set::can_connect(const std::string& endpoint) const {
  auto listed = unpack_endpoint(endpoint);
  if (!listed) return false;
  std::lock_guard<std::mutex> g(impl_->m);
  for (const auto& m : impl_->members)
    for (const auto& [name, ep] : listed.value())
      if (name == m->name() && m->can_connect(ep)) return true;
  return false;
}

result<region_desc> transport_set::register_memory(std::uint64_t owner, void* base, std::uint64_t len) {
  std::lock_guard<std::mutex> g(impl_->m);
  // Asked only when some member moves more than host memory (asking the CUDA runtime starts it).
  bool beyond_host = false;
  for (const auto& m : impl_->members)
    for (auto t : m->memory_types()) beyond_host = beyond_host || t != memory_type::host;
  const auto type = beyond_host ? impl_->probe(base) : memory_type::host;
  impl::local_region r;
  r.address = reinterpret_cast<std::uintptr_t>(base);
  r.size = len;
  std::string refused;
  for (std::size_t i = 0; i < impl_->members.size(); ++i) {
    auto& m = impl_->members[i];
    const auto types = m->memory_types();
    if (std::find(types.begin(), types.end(), type) == types.end()) continue;
    auto d = m->register_memory(owner, base, len);
    if (d)
      r.parts.emplace_back(i, d.value());
    else
      refused += std::string(refused.empty() ? "" : "; ") + m->name() + ": " + d.error().reason();
  }
  if (r.parts.empty())
    return status::error(std::string("no transport here registers ") + to_string(type) + " memory" +
                         (refused.empty() ? "" : " (" + refused + ")"));
  const auto id = impl_->add_local(r);
  return impl_->describe(id, impl_->locals.at(id));
}

result<allocation> transport_set::allocate_memory(std::uint64_t owner, std::uint64_t len) {
  std::lock_guard<std::mutex> g(impl_->m);
  std::string refused;
  for (auto i : impl_->order) {
    auto a = impl_->members[i]->allocate_memory(owner, len);
    if (!a) {
      refused += std::string(refused.empty() ? "" : "; ") + a.error().reason();
      continue;
    }
    impl::local_region r;
    r.address = reinterpret_cast<std::uintptr_t>(a->base);
    r.size = len;
    r.allocated = true;
    r.parts.emplace_back(i, a->desc);
    const auto id = impl_->add_local(r);
    return allocation{impl_->describe(id, impl_->locals.at(id)), a->base};
  }
  return status::error(refused.empty() ? "no transport" : refused);
}

result<region_desc> transport_set::region_of(const void* base, std::uint64_t len) const {
  const auto b = reinterpret_cast<std::uintptr_t>(base);
  std::lock_guard<std::mutex> g(impl_->m);
  for (const auto& [id, r] : impl_->locals)
    if (r.allocated && b >= r.address && len <= r.size && b - r.address <= r.size - len) return impl_->describe(id, r);
  return status::error("no memory allocated through the transport set holds that range");
}

void transport_set::deregister_memory(std::uint64_t region) {
  impl::local_region r;
  std::vector<std::shared_ptr<transport>> members;
  {
    std::lock_guard<std::mutex> g(impl_->m);
    auto it = impl_->locals.find(region);
    if (it == impl_->locals.end()) return;
    r = std::move(it->second);
    impl_->locals.erase(it);
    members = impl_->members;
  }
  // Outside the lock: a member's deregister waits for pushes into the region to finish.
  for (const auto& [mi, d] : r.parts) members[mi]->deregister_memory(d.id);
}

status transport_set::connect(std::uint64_t peer, const std::string& endpoint, const std::vector<region_desc>& regions) {
  auto listed = unpack_endpoint(endpoint);
  if (!listed) return listed.error();
  std::unique_lock<std::mutex> g(impl_->m);
  const auto members = impl_->members;
  const auto order = impl_->order;
  g.unlock();
  auto peer_endpoint = [&](const std::string& name) -> const std::string* {
    for (const auto& [n, ep] : listed.value())
      if (n == name) return &ep;
    return nullptr;
  };
  impl::peer_link link;
  std::vector<std::vector<region_desc>> per_member(members.size());
  for (const auto& d : regions) {
    auto parts = unpack_key(d);
    if (!parts) return parts.error();
    bool routed = false;
    // This side's order of preference decides among the members the peer described it to.
    for (std::size_t k = 0; k < order.size() && !routed; ++k) {
      const auto i = order[k];
      const auto* ep = peer_endpoint(members[i]->name());
      if (ep == nullptr || !members[i]->can_connect(*ep)) continue;
      for (const auto& p : parts.value())
        if (p.member == members[i]->name()) {
          link.routes.emplace(d.id, impl::route{i, p.desc.id});
          per_member[i].push_back(p.desc);
          routed = true;
          break;
        }
    }
    if (!routed) {
      std::string offered;
      for (const auto& p : parts.value()) offered += (offered.empty() ? "" : ", ") + p.member;
      return status::error("region " + std::to_string(d.id) + " of peer " + std::to_string(peer) +
                           " is reachable through no transport here (it offers " +
                           (offered.empty() ? std::string("none") : offered) + ")");
    }
  }
  for (std::size_t i = 0; i < members.size(); ++i) {
    if (per_member[i].empty()) continue;
    if (auto s = members[i]->connect(peer, *peer_endpoint(members[i]->name()), per_member[i]); !s)
      return status::error(std::string(members[i]->name()) + ": " + s.reason());
    link.members.push_back(i);
  }
  std::vector<std::size_t> dropped;
  g.lock();
  if (auto old = impl_->peers.find(peer); old != impl_->peers.end())
    for (auto mi : old->second.members)
      if (std::find(link.members.begin(), link.members.end(), mi) == link.members.end()) dropped.push_back(mi);
  impl_->peers[peer] = std::move(link);
  g.unlock();
  for (auto mi : dropped) members[mi]->disconnect(peer);
  return {};
}

void transport_set::disconnect(std::uint64_t peer) {
  std::vector<std::shared_ptr<transport>> to;
  {
    std::lock_guard<std::mutex> g(impl_->m);
    auto it = impl_->peers.find(peer);
    if (it == impl_->peers.end()) return;
    for (auto mi : it->second.members) to.push_back(impl_->members[mi]);
    impl_->peers.erase(it);
  }
  for (auto& m : to) m->disconnect(peer);
}

void transport_set::push(std::uint64_t peer, const std::vector<block>& blocks, completion done) {
  push_after(0, peer, blocks, std::move(done));
}

void transport_set::push_after(std::uintptr_t ready_fence, std::uint64_t peer, const std::vector<block>& blocks,
                               completion done) {
  // Split by member, the region ids translated to the member's.
  std::vector<std::shared_ptr<transport>> members;
  std::vector<char> ordered;
  std::vector<std::vector<block>> parts;
  std::string refusal;  // answered outside the lock: a completion may run the caller's code
  {
    std::lock_guard<std::mutex> g(impl_->m);
    auto it = impl_->peers.find(peer);
    if (it == impl_->peers.end()) {
      refusal = "peer " + std::to_string(peer) + " is not connected";
    } else {
      const auto& routes = it->second.routes;
      members = impl_->members;
      ordered = impl_->ordered;
      parts.resize(members.size());
      std::uint64_t last_region = 0;
      const impl::route* last = nullptr;
      for (const auto& b : blocks) {
        if (last == nullptr || b.region != last_region) {
          auto r = routes.find(b.region);
          if (r == routes.end()) {
            refusal = "region " + std::to_string(b.region) + " is not registered by peer " + std::to_string(peer);
            break;
          }
          last_region = b.region;
          last = &r->second;
        }
        auto& out = parts[last->member];
        if (out.empty()) out.reserve(blocks.size());
        out.push_back({b.src, last->id, b.offset, b.len});
      }
    }
  }
  if (!refusal.empty()) return done(status::error(std::move(refusal)));
  // A part that reads GPU memory through a member that cannot wait for the fence on the GPU
  // would read the KV before it is written: refused. Host parts (aux rows) need no fence.
  std::size_t used = 0;
  for (std::size_t i = 0; i < parts.size(); ++i) {
    if (parts[i].empty()) continue;
    ++used;
    if (ready_fence == 0 || ordered[i]) continue;
    for (const auto& b : parts[i])
      if (impl_->probe(b.src) != memory_type::host)
        return done(status::error(std::string(members[i]->name()) +
                                  " cannot order a push of GPU memory after a CUDA event"));
  }
  if (used == 0) return done(status{});
  auto send = [&](std::size_t i, completion c) {
    if (ordered[i])
      members[i]->push_after(ready_fence, peer, parts[i], std::move(c));
    else
      members[i]->push(peer, parts[i], std::move(c));
  };
  if (used == 1) {
    for (std::size_t i = 0; i < parts.size(); ++i)
      if (!parts[i].empty()) send(i, std::move(done));
    return;
  }
  // Done once every part is, with the first failure.
  struct join {
    std::atomic<std::size_t> left;
    std::mutex m;
    status first;
    completion done;
  };
  auto j = std::make_shared<join>();
  j->left = used;
  j->done = std::move(done);
  for (std::size_t i = 0; i < parts.size(); ++i) {
    if (parts[i].empty()) continue;
    send(i, [j](status s) {
      if (!s) {
        std::lock_guard<std::mutex> g(j->m);
        if (j->first) j->first = std::move(s);
      }
      if (j->left.fetch_sub(1) == 1) {
        status out;
        {
          std::lock_guard<std::mutex> g(j->m);
          out = std::move(j->first);
        }
        j->done(std::move(out));
      }
    });
  }
}

std::uint64_t transport_set::bytes_moved() const {
  std::lock_guard<std::mutex> g(impl_->m);
  std::uint64_t n = 0;
  for (const auto& m : impl_->members) n += m->bytes_moved();
  return n;
}

std::string transport_set::chosen(std::uint64_t peer, std::uint64_t region) const {
  std::lock_guard<std::mutex> g(impl_->m);
  auto it = impl_->peers.find(peer);
  if (it == impl_->peers.end()) return {};
  auto r = it->second.routes.find(region);
  return r == it->second.routes.end() ? std::string{} : impl_->members[r->second.member]->name();
}

}  // namespace kvflow::transport
