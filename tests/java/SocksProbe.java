// A standard Java SOCKS5 client for tests: what a Java cloud application sees through the postbridge hub.
//
// Usage: java SocksProbe proxyHost proxyPort user password targetHost targetPort
//
// Connects through the SOCKS5 proxy with RFC 1929 username/password authentication (the JDK's SocksSocketImpl
// asks java.net.Authenticator for the credentials) to targetHost:targetPort, leaving the name unresolved so
// that the proxy receives it as a domain name. On success prints "CONNECTED <first line the server sent>" and
// exits 0; on any failure prints "ERROR <exception class>: <message>" and exits 1.

import java.io.BufferedReader;
import java.io.EOFException;
import java.io.InputStreamReader;
import java.net.Authenticator;
import java.net.InetSocketAddress;
import java.net.PasswordAuthentication;
import java.net.Proxy;
import java.net.Socket;
import java.nio.charset.StandardCharsets;

public final class SocksProbe {
    private static final int TIMEOUT_MILLIS = 15_000;

    private SocksProbe() {}

    public static void main(String[] args) {
        if (args.length != 6) {
            System.out.println("ERROR usage: SocksProbe proxyHost proxyPort user password targetHost targetPort");
            System.exit(2);
        }
        String proxyHost = args[0];
        int proxyPort = Integer.parseInt(args[1]);
        String user = args[2];
        char[] password = args[3].toCharArray();
        String targetHost = args[4];
        int targetPort = Integer.parseInt(args[5]);

        Authenticator.setDefault(new Authenticator() {
            @Override
            protected PasswordAuthentication getPasswordAuthentication() {
                // Only answer the JDK's SOCKS client, never an HTTP server.
                if ("SOCKS5".equals(getRequestingProtocol())) {
                    return new PasswordAuthentication(user, password);
                }
                return null;
            }
        });

        Proxy proxy = new Proxy(Proxy.Type.SOCKS, new InetSocketAddress(proxyHost, proxyPort));
        try (Socket socket = new Socket(proxy)) {
            socket.setSoTimeout(TIMEOUT_MILLIS);
            socket.connect(InetSocketAddress.createUnresolved(targetHost, targetPort), TIMEOUT_MILLIS);
            BufferedReader reader = new BufferedReader(
                    new InputStreamReader(socket.getInputStream(), StandardCharsets.ISO_8859_1));
            String line = reader.readLine();
            if (line == null) {
                throw new EOFException("connection closed before the server sent a line");
            }
            System.out.println("CONNECTED " + line);
            System.exit(0);
        } catch (Exception e) {
            System.out.println("ERROR " + e.getClass().getName() + ": " + e.getMessage());
            System.exit(1);
        }
    }
}
