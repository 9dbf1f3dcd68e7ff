#pragma once
// The command's processes (launch, bootstrap, rank, bench workers) stop in order on a signal:
// SIGTERM, SIGINT and SIGHUP set a flag instead of ending the process, so its peers see a clean
// departure, not a lost connection. The library never installs handlers; only the command does.
namespace kvflow::command {

void install_stop_signals();
bool stop_requested();

}  // namespace kvflow::command
