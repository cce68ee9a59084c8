// A Java node (JInterface's OtpNode) for tests/test_clients.py.
//
//   java -cp OtpErlang.jar:DIR JNode NAME COOKIE
//
// Starts an OtpNode called NAME (registering with the epmd on $ERL_EPMD_PORT
// through OtpEpmd.publishPort), prints "NODE <full name> <port>", and serves
// a mailbox registered as "jecho" that answers {Pid, Msg} with {jecho, Msg}.
// Then it reads commands from stdin, one a line, and prints one line each:
//
//   lookup NODE      OtpEpmd.lookupPort: "PORT NODE <port>" (0: not found)
//   ping NODE        OtpNode.ping: "PING NODE true|false"
//   echo NODE        sends {self(), hello_from_java} to {echo, NODE} and
//                    prints "ECHO <reply>" (or "ECHO none" after 10 s)
//   quit             closes the node (OtpEpmd.unPublishPort) and exits
//
// End of input does the same as quit.
import com.ericsson.otp.erlang.*;
import java.io.BufferedReader;
import java.io.InputStreamReader;

public class JNode {
    static void say(String s) {
        System.out.println(s);
        System.out.flush();
    }

    static OtpErlangTuple tuple(OtpErlangObject a, OtpErlangObject b) {
        return new OtpErlangTuple(new OtpErlangObject[] {a, b});
    }

    public static void main(String[] args) throws Exception {
        final OtpNode node = new OtpNode(args[0], args[1]);
        final OtpMbox echo = node.createMbox("jecho");
        Thread server = new Thread(() -> {
            while (true) {
                try {
                    OtpErlangObject o = echo.receive();
                    if (o instanceof OtpErlangTuple && ((OtpErlangTuple) o).arity() == 2
                            && ((OtpErlangTuple) o).elementAt(0) instanceof OtpErlangPid) {
                        OtpErlangTuple t = (OtpErlangTuple) o;
                        echo.send((OtpErlangPid) t.elementAt(0), tuple(new OtpErlangAtom("jecho"), t.elementAt(1)));
                    }
                } catch (Exception e) {
                    return;
                }
            }
        });
        server.setDaemon(true);
        server.start();
        say("NODE " + node.node() + " " + node.port());

        BufferedReader in = new BufferedReader(new InputStreamReader(System.in));
        String line;
        while ((line = in.readLine()) != null) {
            String[] w = line.trim().split(" ");
            if (w[0].equals("lookup")) {
                say("PORT " + w[1] + " " + OtpEpmd.lookupPort(new OtpPeer(w[1])));
            } else if (w[0].equals("ping")) {
                say("PING " + w[1] + " " + node.ping(w[1], 10000));
            } else if (w[0].equals("echo")) {
                OtpMbox m = node.createMbox();
                m.send("echo", w[1], tuple(m.self(), new OtpErlangAtom("hello_from_java")));
                OtpErlangObject r = m.receive(10000);
                say("ECHO " + (r == null ? "none" : r.toString()));
                m.close();
            } else if (w[0].equals("quit")) {
                break;
            }
        }
        node.close();
        say("CLOSED");
        System.exit(0);
    }
}
