# A tsbroker plug-in in Python: sends new logons to the candidate with the fewest
# active sessions, from its own view built out of the broker's notifications.
#   python plugin.py [LISTEN]       (default 127.0.0.1:50070)
from concurrent import futures
import collections
import sys
import grpc
from tsbroker.v1 import plugin_pb2, plugin_pb2_grpc, types_pb2

class Plugin(plugin_pb2_grpc.PluginServicer):
    def __init__(self):
        self.sessions = collections.defaultdict(dict)  # machine id -> {session id: state}
        self.resync = {}                                # machine id -> batches so far
        self.initialized = False

    def initialized_or_abort(self, context):
        # Started (again) since the broker's Initialize: this view is empty. The broker
        # initializes and resyncs a plug-in that says so.
        if not self.initialized:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "not initialized")

    def Initialize(self, request, context):
        self.sessions.clear()
        self.resync.clear()
        self.initialized = True
        print("initialized for farms", list(request.farms), flush=True)
        return plugin_pb2.InitializeResponse(name="python-example")

    def Terminated(self, request, context):
        return plugin_pb2.TerminatedResponse()

    def MachineChangeNotification(self, request, context):
        self.initialized_or_abort(context)
        if request.type == types_pb2.NOTIFICATION_TYPE_REMOVED:
            self.sessions.pop(request.machine_id, None)
        return plugin_pb2.MachineChangeNotificationResponse()

    def SessionChangeNotification(self, request, context):
        self.initialized_or_abort(context)
        if request.notification == types_pb2.NOTIFICATION_TYPE_RESYNC:
            batch = self.resync.setdefault(request.machine_id, {})
            for change in request.changes:
                batch[change.session.session_id] = change.session.state
            if request.last_batch:
                self.sessions[request.machine_id] = self.resync.pop(request.machine_id)
        else:
            for change in request.changes:
                machine = self.sessions[change.session.machine_id or request.machine_id]
                if change.type == types_pb2.SESSION_EVENT_TYPE_LOGOFF:
                    machine.pop(change.session.session_id, None)
                elif change.type == types_pb2.SESSION_EVENT_TYPE_DISCONNECT:
                    machine[change.session.session_id] = types_pb2.SESSION_STATE_DISCONNECTED
                else:
                    machine[change.session.session_id] = types_pb2.SESSION_STATE_ACTIVE
        return plugin_pb2.SessionChangeNotificationResponse()

    def GetMostSuitableServer(self, request, context):
        self.initialized_or_abort(context)
        def active(candidate):
            states = self.sessions.get(candidate.machine.id, {}).values()
            busy = sum(s == types_pb2.SESSION_STATE_ACTIVE for s in states)
            return (busy + candidate.machine.pending_logons) / max(candidate.machine.weight, 1)
        best = min(request.candidates, key=active, default=None)
        choice = best.machine.id if best else ""  # "" keeps the broker's pick
        print(request.user_name, "->", best.machine.name if best else "(broker's pick)", flush=True)
        return plugin_pb2.GetMostSuitableServerResponse(machine_id=choice)

    def GetUserExternalSession(self, request, context):
        return plugin_pb2.GetUserExternalSessionResponse()

# One thread: notifications change the view and decisions read it, with no lock between them.
server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
plugin_pb2_grpc.add_PluginServicer_to_server(Plugin(), server)
server.add_insecure_port(sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1:50070")
server.start()
server.wait_for_termination()
