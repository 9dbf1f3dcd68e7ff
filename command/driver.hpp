#pragma once
// The workload driver shared by `kvflow simulate` and `kvflow launch`: plays router and
// schedulers (requests, chunks, faults), collects what every rank reports and writes the report.
// Internal to the command.
#include <memory>

#include "command/agreement_checker.hpp"
#include "command/cluster_control.hpp"
#include "command/simulation.hpp"

namespace kvflow::command {

// Runs the workload on the cluster `control` starts, until every request is terminal or the
// deadline passes; fills `report`. `checker` (may be null) sees every agreed round in-process.
void drive(caf::actor_system& sys, const simulation_options& options,
           const std::shared_ptr<simulation_report>& report, std::shared_ptr<cluster_control> control,
           std::shared_ptr<agreement_checker> checker);

}  // namespace kvflow::command
