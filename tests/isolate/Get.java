// `java Get.java URL`: one GET with the JDK's own HttpClient (which ignores
// proxy environment variables), printing "java STATUS BODY".
import java.net.URI;
import java.net.http.HttpClient;
import java.net.http.HttpRequest;
import java.net.http.HttpResponse;

public class Get {
    public static void main(String[] args) throws Exception {
        HttpResponse<String> r = HttpClient.newHttpClient().send(
            HttpRequest.newBuilder(URI.create(args[0])).build(),
            HttpResponse.BodyHandlers.ofString());
        System.out.println("java " + r.statusCode() + " " + r.body());
    }
}
