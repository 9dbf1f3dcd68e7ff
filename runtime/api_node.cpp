// The node of the public API: parses the topology, starts the actor system, the transport and
// (in one process) the registry, and wires each rank into its agreement group: written once for
// every engine (the simulator, rank processes, an embedding serving process).
#include <chrono>

#include <caf/scheduler/test_coordinator.hpp>
#include <spdlog/sinks/base_sink.h>
#include <spdlog/spdlog.h>

#include "actors/bootstrap_registry.hpp"
#include "actors/messages.hpp"
#include "actors/supervisor.hpp"
#include "runtime/actor_system_setup.hpp"
#include "runtime/api_internal.hpp"
#include "runtime/node.hpp"
#include "cuda/fence_pool.hpp"
#include "cuda/gpu.hpp"
#include "transport/cuda_ipc_transport.hpp"
#include "transport/inproc_transport.hpp"
#include "transport/staged_transport.hpp"
#include "transport/ucx_staged_transport.hpp"
#include "transport/transport_set.hpp"
#include "transport/ucx_transport.hpp"

namespace kvflow {

const char* to_string(errc e) {
  switch (e) {
    case errc::ok: return "ok";
    case errc::invalid_argument: return "invalid argument";
    case errc::not_found: return "not found";
    case errc::exists: return "exists";
    case errc::not_ready: return "not ready";
    case errc::timeout: return "timeout";
    case errc::unsupported: return "unsupported";
    case errc::unavailable: return "unavailable";
    case errc::internal: return "internal error";
  }
  return "?";
}

const char* to_string(poll_state s) { return kvflow::to_string(static_cast<kv_poll>(s)); }

namespace {

// Hands spdlog's lines to the engine's callback (only when the engine gave one).
class callback_sink final : public spdlog::sinks::base_sink<std::mutex> {
 public:
  explicit callback_sink(std::function<void(log_level, const std::string&)> f) : f_(std::move(f)) {}

 protected:
  void sink_it_(const spdlog::details::log_msg& m) override {
    f_(static_cast<log_level>(static_cast<int>(m.level)), std::string(m.payload.data(), m.payload.size()));
  }
  void flush_() override {}

 private:
  std::function<void(log_level, const std::string&)> f_;
};

error invalid(std::string m) { return {errc::invalid_argument, std::move(m)}; }

expected<config::tunables> tunables_of(const node_options& o) {
  std::vector<std::string> known;
  for (const auto& [var, value] : config::to_env(config::tunables{})) known.push_back(var);
  for (const auto& [var, value] : o.tunables)
    if (std::find(known.begin(), known.end(), var) == known.end())
      return invalid("tunables: unknown variable " + var + " (see kvflow --help)");
  try {
    return config::load_tunables([&](const char* var) -> const char* {
      for (const auto& [k, v] : o.tunables)
        if (k == var) return v.c_str();
      return o.read_environment ? std::getenv(var) : nullptr;
    });
  } catch (const config::config_error& e) {
    return invalid(e.what());
  }
}

// The node-link settings: the command's resolved ones, else the options' (and the environment's
// when read_environment), checked (errors name the variable), listening beyond loopback refused
// without TLS or a token.
expected<config::link_security> links_of(const node_options& o, const runtime::internal_options& in) {
  try {
    config::link_security s;
    if (in.links) {
      s = *in.links;
    } else {
      s.auth_token = o.auth_token;
      s.auth_token_file = o.auth_token_file;
      s.tls_certificate = o.tls_certificate;
      s.tls_key = o.tls_key;
      s.tls_ca = o.tls_ca;
      if (o.allow_insecure_listen) s.allow_insecure_listen = "1";
      s = config::resolve_link_security(s, o.read_environment ? config::link_env_lookup(::getenv) : nullptr);
    }
    if (!o.listen.empty()) config::check_listen_address(s, runtime::parse_host_port(o.listen, "listen").host, "listen");
    return s;
  } catch (const config::config_error& e) {
    return invalid(e.what());
  }
}

}  // namespace

local_group& node::impl::group(int id) { return groups[id]; }

node::node(std::unique_ptr<impl> p) : impl_(std::move(p)) {}
node::~node() { stop(); }

expected<std::shared_ptr<node>> node::start(const topology& t, node_options options) {
  return runtime::start_node(t, std::move(options), {});
}

std::string node::address() const {
  if (!impl_->net) return {};
  return runtime::network_address(*impl_);
}

void node::stop() {
  auto& n = *impl_;
  if (!n.sys || n.stopped->exchange(true)) return;
  // Prefill ranks before decode ranks (a writer leaves before the memory it writes goes), then
  // the supervisors and the registry.
  {
    // Sent from an actor of this process, so each exit names its sender (not anonymous).
    caf::scoped_actor stopper{*n.sys};
    for (auto* list : {&n.prefill_actors, &n.decode_actors, &n.infrastructure})
      for (auto& a : *list) stopper->send_exit(a, caf::exit_reason::user_shutdown);
  }
  if (n.internal.deterministic) {
    auto& sched = dynamic_cast<caf::scheduler::test_coordinator&>(n.sys->scheduler());
    sched.run();
  }
  n.prefill_actors.clear();
  n.decode_actors.clear();
  n.infrastructure.clear();
  runtime::stop_network(n);
  if (n.links) n.links->stop();
  n.registry = nullptr;
  n.groups.clear();
  n.sys.reset();  // waits for every actor
  n.transport.reset();
}

namespace runtime {

expected<config::cluster_config> to_cluster(const topology& t) {
  try {
    config::cluster_config c;
    c.prefill = {t.prefill.tp, t.prefill.cp, t.prefill.pp, t.prefill.dp};
    c.decode = {t.decode.tp, t.decode.dp, t.decode.pp};
    c.dtype = config::parse_dtype(t.dtype);
    c.model = config::parse_model(t.model, c.dtype);
    c.page_size = t.page_size;
    c.cp_send_all = t.cp_send_all;
    config::validate(c);
    return c;
  } catch (const config::config_error& e) {
    return invalid(e.what());
  }
}

topology topology_of(const config::cluster_config& c) {
  topology t;
  t.prefill = {c.prefill.tp, c.prefill.cp, c.prefill.pp, c.prefill.dp};
  t.decode = {c.decode.tp, c.decode.dp, c.decode.pp};
  t.model = config::describe(c.model);
  t.dtype = config::to_string(c.dtype);
  t.page_size = c.page_size;
  t.cp_send_all = c.cp_send_all;
  return t;
}

expected<std::shared_ptr<node>> start_node(const topology& t, node_options options, internal_options internal) {
  auto cluster = to_cluster(t);
  if (!cluster) return cluster.err();
  auto tun = internal.tunables ? expected<config::tunables>(*internal.tunables) : tunables_of(options);
  if (!tun) return tun.err();
  const bool networked = !options.bootstrap.empty() || !options.listen.empty();
  config::link_security links;
  if (networked) {
    auto given = links_of(options, internal);
    if (!given) return given.err();
    links = given.value();
  }
  if (networked && !internal.transport && options.transport != "ucx")
    return invalid("transport: '" + options.transport + "' cannot cross processes (a node with a bootstrap or listen address needs ucx)");
  if (networked && internal.deterministic) return invalid("listen: a deterministic node runs in one process");
  auto n = std::make_unique<node::impl>();
  n->cluster = cluster.value();
  try {
    n->plan = std::make_shared<const config::routing_plan>(n->cluster);
  } catch (const config::config_error& e) {
    return invalid(e.what());
  }
  n->tunables = tun.value();
  n->internal = std::move(internal);
  if (options.log) {
    auto logger = std::make_shared<spdlog::logger>("kvflow", std::make_shared<callback_sink>(options.log));
    logger->set_level(static_cast<spdlog::level::level_enum>(static_cast<int>(options.min_level)));
    spdlog::set_default_logger(logger);
  }
  if (n->internal.transport) {
    n->transport = n->internal.transport;
  } else {
    std::shared_ptr<transport::transport> base;
    if (options.transport == "inproc") {
      base = std::make_shared<transport::inproc_transport>(std::make_shared<transport::inproc_fabric>());
    } else if (options.transport == "ucx") {
      auto made = transport::ucx_transport::create(transport::ucx_options_from(n->tunables));
      if (!made) return error{errc::unavailable, "transport ucx: " + made.error().reason()};
      base = std::move(made.value());
    } else {
      return invalid("transport: '" + options.transport + "' is not inproc or ucx");
    }
    n->transports = std::make_shared<transport::transport_set>(
        std::vector<std::shared_ptr<transport::transport>>{std::move(base)}, [](const void* p) {
          return cuda::query_pointer(p).kind == cuda::pointer_kind::device ? transport::memory_type::cuda
                                                                           : transport::memory_type::host;
        });
    n->transport = n->transports;
  }
  n->cfg = std::make_unique<caf::actor_system_config>();
  const auto link_set = runtime::link_settings_of(links, n->tunables);
  if (networked) {
    try {
      runtime::configure_node(*n->cfg, n->tunables, link_set);  // the middleman, with heartbeats
    } catch (const config::config_error& e) {
      return invalid(e.what());
    }
  } else
    runtime::configure_actor_system(*n->cfg);
  if (n->internal.add_message_types) n->internal.add_message_types(*n->cfg);
  if (n->internal.deterministic) n->cfg->set("scheduler.policy", caf::atom("testing"));
  if (options.worker_threads > 0) n->cfg->set("scheduler.max-threads", options.worker_threads);
  n->sys = std::make_unique<caf::actor_system>(*n->cfg);
  if (networked) n->links = runtime::link_guard::start(*n->sys, link_set);
  if (options.bootstrap.empty()) {  // this node hosts the registry (joining nodes find it at listen)
    n->registry = spawn_bootstrap_registry(*n->sys, n->cluster);
    n->infrastructure.push_back(n->registry);
  }
  auto made = internal_access::make(std::move(n));
  if (networked) {
    if (auto s = start_network(internals(*made), options); !s) {
      made->stop();
      return error{errc::unavailable, s.reason()};
    }
  }
  return made;
}

}  // namespace runtime

namespace runtime {

expected<int> gpu_of(const memory_desc& m) {
  int gpu = -1;
  for (std::size_t i = 0; i < m.buffers.size(); ++i) {
    const auto& b = m.buffers[i];
    if (b.kind != memory_kind::cuda) continue;
    const auto name = "memory: buffer " + std::to_string(i);
    if (!cuda::built_with_cuda()) return error{errc::unsupported, name + " is CUDA memory; this build has no CUDA"};
    if (gpu >= 0 && b.device != gpu)
      return invalid(name + " is on CUDA device " + std::to_string(b.device) + ", another buffer on " +
                     std::to_string(gpu) + " (a rank's buffers share one device)");
    // The engine's word is checked: a transport would write it as device memory.
    if (b.bytes > 0) {
      const auto at = cuda::query_pointer(b.base);
      if (at.kind != cuda::pointer_kind::device || at.device != b.device)
        return invalid(name + " is declared memory of CUDA device " + std::to_string(b.device) +
                       " but its base is not device memory of it");
    }
    gpu = b.device;
  }
  if (gpu >= 0)
    for (std::size_t i = 0; i < m.buffers.size(); ++i)
      if (m.buffers[i].kind == memory_kind::host && m.buffers[i].bytes > 0 &&
          cuda::query_pointer(m.buffers[i].base).kind == cuda::pointer_kind::device)
        return invalid("memory: buffer " + std::to_string(i) + " is declared host memory but is device memory");
  return gpu;
}

expected<std::vector<buffer_spec>> to_buffer_specs(const memory_desc& m) {
  std::vector<buffer_spec> out;
  if (auto gpu = gpu_of(m); !gpu) return gpu.err();
  for (const auto& b : m.buffers) {
    buffer_kind k = buffer_kind::latent;
    switch (b.role) {
      case buffer_role::k: k = buffer_kind::k; break;
      case buffer_role::v: k = buffer_kind::v; break;
      case buffer_role::mla_latent: k = buffer_kind::latent; break;
      case buffer_role::aux: k = buffer_kind::aux; break;
      case buffer_role::state: k = buffer_kind::state; break;
      default: return invalid("memory: unknown buffer role " + std::to_string(static_cast<int>(b.role)));
    }
    out.push_back({{static_cast<std::byte*>(b.base), b.bytes, b.page_bytes}, k, b.layer});
  }
  return out;
}

}  // namespace runtime

namespace runtime {

expected<std::shared_ptr<rank::impl>> make_rank(const rank_context& ctx, bool prefill, int r,
                                                const memory_desc& memory, const agreement_link& link,
                                                std::shared_ptr<const void> owner) {
  const auto& plan = *ctx.plan;
  auto specs = to_buffer_specs(memory);
  if (!specs) return specs.err();
  const int gpu = gpu_of(memory).value();  // checked by to_buffer_specs
  std::shared_ptr<cuda::fence_pool> fences;
  if (prefill && gpu >= 0) {
    auto made = cuda::fence_pool::create(gpu);
    if (!made) return error{errc::unavailable, "memory: CUDA device " + std::to_string(gpu) + ": " + made.error().reason()};
    fences = std::move(made.value());
  }
  auto mem = rank_memory::create(plan, prefill, r, {memory.layer_begin, memory.layer_end}, specs.value());
  if (!mem) return invalid(mem.error().reason());
  mem.value().owner = std::move(owner);
  auto memv = std::make_shared<const rank_memory>(std::move(mem.value()));
  const bool needs_aux = prefill ? plan.prefill(r).authoritative : plan.decode(r).expects_aux;
  if (needs_aux && memv->aux_buffers().empty())
    return invalid("memory: this rank moves aux rows but has no aux buffer");
  auto ri = std::make_shared<rank::impl>();
  ri->prefill = prefill;
  ri->rank = r;
  ri->group = link.group;
  ri->plan = ctx.plan;
  ri->memory = memv;
  ri->stopped = ctx.stopped;
  ri->lag = static_cast<std::uint64_t>(ctx.tunables.agreement_lag);
  ri->default_wait = std::chrono::microseconds(ctx.tunables.poll_wait_us);
  ri->late_create_window = std::chrono::milliseconds(ctx.tunables.bootstrap_timeout_ms);
  ri->authoritative = needs_aux;
  ri->fences = fences;
  ri->shared = std::make_shared<rank_shared>();
  ri->shared->store = state_store(static_cast<std::size_t>(ctx.tunables.max_rooms_per_rank));
  ri->shared->cleared_reasons = failure_memory{4096, std::chrono::milliseconds(ctx.tunables.failure_memory_ms)};
  ri->parent = link.parent;
  ri->child = link.child;
  ri->board = link.board;
  ri->ring = link.ring;
  ri->shm = link.shm;
  rank_args a;
  a.plan = ctx.plan;
  a.rank = r;
  a.tunables = ctx.tunables;
  a.transport = ctx.transport;
  a.memory = memv;
  a.shared = ri->shared;
  a.parent = link.parent;
  a.root = link.root;
  a.child_index = link.child;
  a.group = link.group;
  a.board = link.board;
  a.ring = link.ring;
  a.registry = ctx.registry;
  a.fences = std::move(fences);
  if (!prefill) a.drop_dst = ctx.drop_dst;
  ri->actor = prefill ? spawn_prefill_rank(ctx.sys, std::move(a)) : spawn_decode_rank(ctx.sys, std::move(a));
  return ri;
}

std::size_t ring_rounds(const config::tunables& t) {
  // The ring holds more rounds than a reader can lag behind (see agreed_ring).
  return std::max<std::size_t>(256, 4 * static_cast<std::size_t>(t.agreement_lag) + 4);
}

}  // namespace runtime

// Rank r's place in its group's agreement tree in one process: the group's TP supervisor and
// ring come with its first rank (decode ranks post on its board, prefill shards report to it
// by message), a prefill shard's supervisor and board with the shard's first rank.
runtime::group_place runtime::place_in_group(const config::cluster_config& c, bool prefill, int r) {
  if (prefill) {
    auto pc = config::prefill_coord_of(c.prefill, r);
    return {config::prefill_group_of(c.prefill, pc), c.prefill.tp * c.prefill.cp * c.prefill.pp,
            (pc.pp * c.prefill.tp + pc.tp) * c.prefill.cp + pc.cp};
  }
  auto dc = config::decode_coord_of(c.decode, r);
  return {config::decode_group_of(c.decode, dc), c.decode.tp * c.decode.pp, config::decode_child_of(c.decode, dc)};
}

// A group of this process agrees through a segment of shared memory, as the ranks of one host do
// across processes: every rank posts into it, and the merge thread of the group's root writes each
// round into it for every rank to read in place (no actor hop per round). Not on the
// deterministic scheduler (the simulator's interleavings schedule every hop, and a merge thread
// is not theirs to schedule), with KVFLOW_AGREEMENT_VIA=2, or where /dev/shm cannot take the
// segment: then through the tree of supervisors (local_link below).
static std::optional<runtime::agreement_link> shm_link(node::impl& n, bool prefill, int r) {
  if (n.internal.deterministic || n.tunables.agreement_via != 1) return std::nullopt;
  const auto place = runtime::place_in_group(n.cluster, prefill, r);
  auto& grp = n.group(place.group);
  if (!grp.root) {
    auto seg = runtime::make_segment(n, place.group, place.ranks);
    if (!seg) return std::nullopt;
    supervisor_args ra;
    ra.children = place.ranks;
    ra.group = place.group;
    ra.root = true;
    ra.shared_memory = seg;
    ra.tombstone_age = tombstone_age(n.tunables);
    grp.root = spawn_supervisor(n.system(), ra, {});
    grp.shm = std::move(seg);
    n.infrastructure.push_back(grp.root);
  }
  if (!grp.shm) return std::nullopt;  // the group's first rank found no room for a segment
  runtime::agreement_link link;
  link.group = place.group;
  link.parent = link.root = grp.root;
  link.child = place.flat;
  link.shm = grp.shm;
  link.ring = std::make_shared<agreed_ring>(runtime::ring_rounds(n.tunables));
  return link;
}

static expected<runtime::agreement_link> local_link(node::impl& n, bool prefill, int r) {
  if (auto via_shm = shm_link(n, prefill, r)) return *via_shm;
  const auto& c = n.cluster;
  auto& sys = n.system();
  auto root_of = [&](int group, int children, bool ranks_board) -> local_group& {
    auto& grp = n.group(group);
    if (grp.root) return grp;
    grp.ring = std::make_shared<agreed_ring>(runtime::ring_rounds(n.tunables));
    supervisor_args ra;
    ra.children = children;
    ra.group = group;
    ra.root = true;
    ra.tombstone_age = tombstone_age(n.tunables);
    if (ranks_board) ra.board = std::make_shared<step_board>(children);
    ra.publish = grp.ring;
    grp.root = spawn_supervisor(sys, ra, {});
    grp.root_board = ra.board;
    n.infrastructure.push_back(grp.root);
    return grp;
  };
  runtime::agreement_link link;
  if (prefill) {
    auto pc = config::prefill_coord_of(c.prefill, r);
    link.group = config::prefill_group_of(c.prefill, pc);
    auto& grp = root_of(link.group, c.prefill.tp * c.prefill.pp, false);
    const int shard = config::prefill_shard_of(c.prefill, pc);
    if (!grp.shards.count(shard)) {
      supervisor_args sa;
      sa.children = c.prefill.cp;
      sa.group = link.group;
      sa.index_in_parent = shard;
      sa.board = std::make_shared<step_board>(c.prefill.cp);
      auto h = spawn_supervisor(sys, sa, grp.root);
      caf::send_as(h, grp.root, msg::attach_child{shard, h});
      grp.shards[shard] = h;
      grp.shard_boards[shard] = sa.board;
      n.infrastructure.push_back(h);
    }
    link.parent = grp.shards[shard];
    link.board = grp.shard_boards[shard];
    link.child = pc.cp;
    link.ring = grp.ring;
  } else {
    auto dc = config::decode_coord_of(c.decode, r);
    link.group = config::decode_group_of(c.decode, dc);
    auto& grp = root_of(link.group, c.decode.tp * c.decode.pp, true);
    link.parent = grp.root;
    link.board = grp.root_board;
    link.child = config::decode_child_of(c.decode, dc);
    link.ring = grp.ring;
  }
  link.root = n.group(link.group).root;
  return link;
}

// Adds one rank of this node: its place in its group's agreement tree and the rank itself.
static expected<std::shared_ptr<rank::impl>> add_rank(node::impl& n, bool prefill, const coords& where,
                                                      const memory_desc& memory, std::shared_ptr<const void> owner) {
  if (n.stopped->load()) return error{errc::unavailable, "the node stopped"};
  const auto& c = n.cluster;
  int r = 0;
  if (prefill) {
    if (where.tp < 0 || where.tp >= c.prefill.tp || where.cp < 0 || where.cp >= c.prefill.cp || where.pp < 0 ||
        where.pp >= c.prefill.pp || where.dp < 0 || where.dp >= c.prefill.dp)
      return invalid("coords: outside the prefill topology");
    r = config::prefill_rank_of(c.prefill, {where.dp, where.pp, where.cp, where.tp});
  } else {
    if (where.tp < 0 || where.tp >= c.decode.tp || where.cp != 0 || where.pp < 0 || where.pp >= c.decode.pp ||
        where.dp < 0 || where.dp >= c.decode.dp)
      return invalid("coords: outside the decode topology");
    r = config::decode_rank_of(c.decode, {where.dp, where.pp, where.tp});
  }
  std::lock_guard<std::mutex> g(n.mutex);
  if (n.taken[{prefill, r}]) return {error{errc::exists, "coords: that rank was added already"}};
  if (auto s = runtime::reach_gpu(n, memory, !prefill); s) return {s};
  // Networked, the group may span processes: its supervisors are found through the registry
  // and every rank reports by message. In one process, through the group's boards.
  auto link = n.net ? runtime::link_network(n, prefill, r) : local_link(n, prefill, r);
  if (!link) return link.err();
  dst_filter drop;
  if (n.internal.drop_dst)
    drop = [seam = n.internal.drop_dst](const msg::dst_info& d) { return seam(d.room, d.incarnation); };
  runtime::rank_context ctx{n.system(), n.plan, n.tunables, n.transport, runtime::current_registry(n),
                            std::move(drop), n.stopped};
  auto ri = runtime::make_rank(ctx, prefill, r, memory, link.value(), std::move(owner));
  if (!ri) return ri.err();
  n.taken[{prefill, r}] = true;
  const caf::actor& actor = ri.value()->actor;
  (prefill ? n.prefill_actors : n.decode_actors).push_back(actor);
  if (n.net) {
    runtime::registered_network(n, prefill, r, actor, link.value());
    return ri;
  }
  // Registered by the node as well as by the rank itself (idempotent), so a rank that dies
  // before it ever runs still completes the table, as down.
  if (prefill) {
    auto pc = config::prefill_coord_of(c.prefill, r);
    caf::send_as(actor, n.registry, msg::register_rank{msg::wire_version, {pc.dp, pc.cp, pc.tp, pc.pp},
                                                       "prefill rank " + std::to_string(r), actor, handshake_of(c)});
  } else {
    caf::send_as(actor, n.registry, msg::register_decode{r, actor});
  }
  return ri;
}

expected<runtime::added_rank> runtime::add_rank(node& n, bool prefill, const coords& where, const memory_desc& memory,
                                                std::shared_ptr<const void> owner) {
  auto ri = kvflow::add_rank(runtime::internals(n), prefill, where, memory, std::move(owner));
  if (!ri) return ri.err();
  added_rank out;
  out.actor = ri.value()->actor;
  out.group = ri.value()->group;
  if (prefill)
    out.prefill = std::make_shared<prefill_rank>(std::move(ri.value()));
  else
    out.decode = std::make_shared<decode_rank>(std::move(ri.value()));
  return out;
}

coords runtime::coords_of(const config::cluster_config& c, bool prefill, int r) {
  if (prefill) {
    auto pc = config::prefill_coord_of(c.prefill, r);
    return {pc.tp, pc.cp, pc.pp, pc.dp};
  }
  auto dc = config::decode_coord_of(c.decode, r);
  return {dc.tp, 0, dc.pp, dc.dp};
}

caf::actor_system& runtime::system_of(node& n) { return runtime::internals(n).system(); }
std::shared_ptr<const config::routing_plan> runtime::plan_of(node& n) { return runtime::internals(n).plan; }
std::shared_ptr<transport::transport> runtime::transport_of(node& n) { return runtime::internals(n).transport; }

expected<std::shared_ptr<prefill_rank>> node::add_prefill(const coords& where, const memory_desc& memory) {
  auto r = add_rank(*impl_, true, where, memory, {});
  if (!r) return r.err();
  return std::make_shared<prefill_rank>(std::move(r.value()));
}

expected<std::shared_ptr<decode_rank>> node::add_decode(const coords& where, const memory_desc& memory) {
  auto r = add_rank(*impl_, false, where, memory, {});
  if (!r) return r.err();
  return std::make_shared<decode_rank>(std::move(r.value()));
}

}  // namespace kvflow

namespace kvflow::runtime {

error reach_gpu(node::impl& n, const memory_desc& memory, bool receiving) {
  auto gpu = gpu_of(memory);
  if (!gpu) return gpu.err();
  if (gpu.value() < 0) return {};
  if (!n.transports) return {errc::unsupported, "memory: CUDA buffers need the node's own transports"};
  if (n.gpu >= 0 && n.gpu != gpu.value())
    return {errc::unsupported, "memory: this node drives CUDA device " + std::to_string(n.gpu) +
                                   "; a rank on device " + std::to_string(gpu.value()) + " needs a node of its own"};
  if (n.gpu < 0) {
    auto ipc = transport::cuda_ipc_transport::create({gpu.value()});
    if (!ipc) return {errc::unavailable, "memory: " + ipc.error().reason()};
    std::shared_ptr<transport::staged_transport> staged;
    transport::staged_options o;
    o.device = gpu.value();
    o.ring = {static_cast<std::uint32_t>(n.tunables.staged_lanes), static_cast<std::uint32_t>(n.tunables.staged_slots),
              static_cast<std::uint64_t>(n.tunables.staged_slot_bytes), o.ring.max_descs};
    o.slot_timeout = std::chrono::milliseconds(n.tunables.staged_slot_timeout_ms);
    if (n.tunables.gpu_staged != 3) {
      auto made = transport::staged_transport::create(o);
      if (!made) return {errc::unavailable, "memory: " + made.error().reason()};
      staged = std::move(made.value());
    }
    // Preferred where they reach (GPU memory on this host), CUDA IPC first unless the tunable
    // says otherwise; the node's transport for the rest (host memory, other hosts).
    const bool staged_first = n.tunables.gpu_staged == 2;
    if (staged && !staged_first) n.transports->add(staged, true);
    n.transports->add(std::shared_ptr<transport::transport>(std::move(ipc.value())), true);
    if (staged && staged_first) n.transports->add(staged, true);
    // Other hosts' GPU KV through the same ring, a UCX host put in the middle: ahead of UCX's own
    // puts of GPU memory, which without GPUDirect are emulated over tcp (0.4 GB/s). It reaches
    // no peer on this host, so the members above keep those.
    if (staged && n.transports->member("ucx")) {
      transport::ucx_staged_options remote;
      remote.staged = o;
      remote.tcp_beyond_loopback = n.tunables.ucx_tcp == 2;
      auto made = transport::ucx_staged_transport::create(remote, staged);
      if (!made) return {errc::unavailable, "memory: " + made.error().reason()};
      n.transports->add(std::shared_ptr<transport::transport>(std::move(made.value())), true);
    }
    n.staged = std::move(staged);
    // The node's UCX orders fenced pushes on this device too (GPU KV to peers CUDA IPC and the
    // staged ring cannot reach: other hosts, with a UCX that writes GPU memory there).
    if (auto ucx = std::dynamic_pointer_cast<transport::ucx_transport>(n.transports->member("ucx"))) {
      if (auto s = ucx->order_on_device(gpu.value()); !s) return {errc::unavailable, "memory: " + s.reason()};
      n.transports->requery();
    }
    n.gpu = gpu.value();
  }
  if (receiving && n.staged)
    if (auto s = n.staged->prepare_receiving(); !s) return {errc::unavailable, "memory: " + s.reason()};
  if (receiving)
    if (auto remote = std::dynamic_pointer_cast<transport::ucx_staged_transport>(n.transports->member("staged_ucx")))
      if (auto s = remote->prepare_receiving(); !s) return {errc::unavailable, "memory: " + s.reason()};
  return {};
}

}  // namespace kvflow::runtime
