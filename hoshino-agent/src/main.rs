fn main() {
    println!("hoshino-agent: skeleton");
}
