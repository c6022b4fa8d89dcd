package dev.herald.example;

import java.net.URI;
import java.sql.Connection;
import java.sql.DriverManager;
import java.sql.PreparedStatement;
import java.sql.ResultSet;
import java.sql.SQLException;
import java.sql.Statement;
import java.util.Properties;

/**
 * A service that places an order and its push notification in one
 * PostgreSQL transaction (JDBC): both commit or neither does. A Herald node
 * with --outbox-postgres delivers the notification once the transaction
 * commits. HERALD_OUTBOX_POSTGRES is the node's URL,
 * postgres://user:password@host:port/database.
 */
public final class OutboxExample {
    public static void main(String[] args) throws Exception {
        String user = args.length > 0 ? args[0] : "alice";
        String postgres = System.getenv("HERALD_OUTBOX_POSTGRES");
        if (postgres == null || postgres.isBlank()) {
            System.err.println("set HERALD_OUTBOX_POSTGRES to the outbox's database, as for the node");
            System.exit(2);
        }
        // JDBC takes host, port and database in its URL, user and password apart.
        URI url = URI.create(postgres);
        Properties login = new Properties();
        if (url.getUserInfo() != null) {
            String[] userInfo = url.getUserInfo().split(":", 2);
            login.setProperty("user", userInfo[0]);
            if (userInfo.length > 1) {
                login.setProperty("password", userInfo[1]);
            }
        }
        String jdbcUrl = "jdbc:postgresql://" + url.getHost() + (url.getPort() > 0 ? ":" + url.getPort() : "")
                + url.getRawPath() + (url.getRawQuery() != null ? "?" + url.getRawQuery() : "");

        try (Connection conn = DriverManager.getConnection(jdbcUrl, login)) {
            // The business table of this example (a real service has its own).
            try (Statement st = conn.createStatement()) {
                st.execute("CREATE TABLE IF NOT EXISTS orders ("
                        + " id bigserial PRIMARY KEY, customer text NOT NULL, total_cents bigint NOT NULL)");
            }
            conn.setAutoCommit(false);
            long orderId;
            try {
                try (PreparedStatement ps = conn.prepareStatement(
                        "INSERT INTO orders (customer, total_cents) VALUES (?, ?) RETURNING id")) {
                    ps.setString(1, user);
                    ps.setLong(2, 4200);
                    try (ResultSet rs = ps.executeQuery()) {
                        rs.next();
                        orderId = rs.getLong(1);
                    }
                }
                // Numbers only; build anything with strings with a JSON library.
                String payload = "{\"order\":" + orderId + ",\"status\":\"paid\"}";
                // Same transaction: rolled back with the order, committed with it.
                try (PreparedStatement ps = conn.prepareStatement(
                        "INSERT INTO herald_outbox (user_ids, topic, payload) VALUES (?, 'orders', ?)")) {
                    ps.setArray(1, conn.createArrayOf("text", new String[] {user}));
                    ps.setString(2, payload);
                    ps.executeUpdate();
                }
                conn.commit();
            } catch (SQLException e) {
                conn.rollback();
                throw e;
            }
            System.out.printf("order %d placed; Herald pushes it to %s%n", orderId, user);
        } catch (SQLException e) {
            System.err.println("place order: " + e.getMessage());
            System.exit(1);
        }
    }
}
